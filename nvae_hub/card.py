"""The model card (``README.md`` with YAML metadata) written next to a pretrained NVAE's weights."""

from __future__ import annotations

from dataclasses import dataclass, field

from huggingface_hub import EvalResult, ModelCardData

from .config import NVAEConfig

CARD_NAME = "README.md"
LIBRARY_NAME = "nvae_hub"
LICENSE = "apache-2.0"
PIPELINE_TAG = "unconditional-image-generation"
TAGS = ("nvae", "vae", "hierarchical-vae", "image-generation", "pytorch")
PAPER_URL = "https://arxiv.org/abs/2007.03898"


@dataclass
class TrainingInfo:
    """How a checkpoint was trained, for its model card."""

    command: str
    """The exact training command."""
    dataset: str
    """The training data set, e.g. "mnist" (also its Hub data set id in the card's metadata)."""
    steps: int
    """Optimiser steps."""
    wall_time_seconds: float
    """Training time."""
    hardware: str
    """What it ran on, e.g. "2-core x86_64 CPU (no GPU)"."""
    metrics: dict[str, float] = field(default_factory=dict)
    """Evaluation results, e.g. {"test_nll_nats": 81.2, "test_bits_per_dim": 0.149}."""
    metrics_note: str = ""
    """How the metrics were measured, e.g. "importance-weighted, K=100, full 10k test set"."""
    beta: float = 1.0
    """Weight of the KL term after warm-up (beta-VAE); 1 is the ordinary ELBO."""


def model_card(config: NVAEConfig, training: TrainingInfo | None = None, num_parameters: int | None = None) -> str:
    """The model card text: YAML front matter (Hub metadata) then a Markdown description of the model."""
    sections = [_summary(config), _usage(), _configuration(config, num_parameters)]
    sections.append(_training(training) if training else "## Training\n\nNo training information was recorded.\n")
    return f"---\n{_metadata(config, training).to_yaml()}\n---\n\n" + "\n".join(sections)


def _metadata(config: NVAEConfig, training: TrainingInfo | None) -> ModelCardData:
    """Hub metadata: library, license, task, tags, data set and (as a model-index) the metrics."""
    eval_results = [
        EvalResult(
            task_type=PIPELINE_TAG,
            dataset_type=training.dataset,
            dataset_name=training.dataset,
            metric_type=name,
            metric_name=name,
            metric_value=value,
        )
        for name, value in training.metrics.items()
    ] if training else []
    return ModelCardData(
        library_name=LIBRARY_NAME,
        license=LICENSE,
        pipeline_tag=PIPELINE_TAG,
        tags=list(TAGS),
        datasets=[training.dataset] if training else None,
        model_name=f"nvae-{config.name}" if eval_results else None,
        eval_results=eval_results or None,
    )


def _summary(config: NVAEConfig) -> str:
    return (
        f"# NVAE ({config.name})\n\n"
        f"An [NVAE]({PAPER_URL}) (Vahdat & Kautz, NeurIPS 2020): a deep hierarchical variational autoencoder whose "
        f"latent groups are arranged in a top-down hierarchy over several spatial scales. It generates "
        f"{config.image_size}x{config.image_size} images and encodes, reconstructs and scores (negative "
        f"log-likelihood) them. Made with `{LIBRARY_NAME}`.\n"
    )


def _usage() -> str:
    return (
        "## Use it\n\n"
        "```python\n"
        "from nvae_hub import load_pretrained\n\n"
        'model = load_pretrained("REPO_ID")  # this repo\'s id, or a folder holding these files; eval mode, CPU\n'
        "images = model.sample(16, temperature=0.7, seed=0)  # (16, C, H, W) in [0, 1]\n"
        "```\n"
    )


def _configuration(config: NVAEConfig, num_parameters: int | None) -> str:
    groups = ", ".join(map(str, config.groups_per_scale_list))
    rows = [
        ("preset", f"`{config.name}`"),
        ("images", f"{config.image_size}x{config.image_size}, {config.channels} channel(s), padding "
                   f"{config.padding}"),
        ("output distribution", config.output),
        ("latent hierarchy", f"{config.num_scales} scale(s), {config.num_groups} groups ({groups} per scale, "
                             f"coarsest first), {config.latent_channels} channels each"),
        ("posterior flows", f"{config.num_flows} pair(s) of IAF cells per group" if config.num_flows else "none"),
    ]
    if num_parameters is not None:
        rows.append(("parameters", f"{num_parameters / 1e6:.2f}M ({num_parameters:,})"))
    table = "\n".join(f"| {key} | {value} |" for key, value in rows)
    return f"## Configuration\n\n| | |\n|---|---|\n{table}\n\nThe full configuration is in `config.json`.\n"


def _training(training: TrainingInfo) -> str:
    text = (
        "## Training\n\n"
        f"```bash\n{training.command}\n```\n\n"
        f"| data set | steps | wall time | hardware |\n|---|---|---|---|\n"
        f"| {training.dataset} | {training.steps:,} | {_duration(training.wall_time_seconds)} | "
        f"{training.hardware} |\n"
        f"\nKL weight after warm-up: β = {training.beta:g}"
        + (" (the ordinary ELBO).\n" if training.beta == 1 else " (a β-VAE objective; β = 1 is the ELBO).\n")
    )
    if training.metrics:
        rows = "\n".join(f"| {name} | {value:g} |" for name, value in training.metrics.items())
        text += f"\n## Evaluation\n\n| metric | value |\n|---|---|\n{rows}\n"
        if training.metrics_note:
            text += f"\n{training.metrics_note}\n"
    return text


def _duration(seconds: float) -> str:
    """E.g. "1 h 02 min" or "42 s"."""
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    if hours:
        return f"{hours} h {minutes:02d} min"
    return f"{minutes} min {secs:02d} s" if minutes else f"{secs} s"
