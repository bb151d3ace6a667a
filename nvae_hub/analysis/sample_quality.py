"""Sample quality as a classifier reads it: how confidently, and as which classes, a classifier trained on the data
set reads the model's samples at temperature 0.7, against how it reads the real test images.

The classifier is the small CNN of ``control``, trained here on the training split with the same settings. It reads
``N`` samples drawn from the same noise twice (``samples.sample_grid``): with the model's BatchNorm statistics and
with statistics re-estimated at the temperature (``NVAE.readjust_bn``, on a copy). For each set of images, and for
the real test images as the reference, the numbers are: the mean top-class probability (with its standard error),
the fraction of images whose top-class probability is above 0.9, and how many images each class gets. Samples that
look like the data score about as the test images do; malformed samples score low, and a skewed histogram shows
classes that the model over- or under-produces.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from nvae_hub.visual import image_grid

from .classifier import class_probabilities, fit_classifier
from .common import Inputs, Result, show_image
from .samples import sample_grid

NEEDS = ("model", "data", "labels")
TEMPERATURE = 0.7
SAMPLES = {"full": 4000, "quick": 200}
CONFIDENT = 0.9
SHOWN = 32  # the least confident samples (BN re-estimated) in the figure


def readout(probabilities: np.ndarray) -> dict[str, Any]:
    """What class probabilities (N, classes) say of the images: mean top-class probability and its standard
    error, the fraction above ``CONFIDENT``, and the number of images read as each class."""
    top = probabilities.max(axis=1)
    counts = np.bincount(probabilities.argmax(axis=1), minlength=probabilities.shape[1])
    return {"mean_top_probability": float(top.mean()),
            "mean_top_probability_stderr": float(top.std(ddof=1) / math.sqrt(len(top))) if len(top) > 1 else None,
            f"fraction_above_{CONFIDENT}": float(np.mean(top > CONFIDENT)),
            "class_counts": counts.tolist(),
            "classes_present": int(np.count_nonzero(counts))}


def run(inputs: Inputs) -> Result:
    """The classifier's reading of ``inputs.model``'s samples and of the real test images."""
    model = inputs.model
    assert model is not None
    n = inputs.size(SAMPLES["full"], SAMPLES["quick"])
    classifier = fit_classifier(inputs)
    drawn = sample_grid(model, (TEMPERATURE,), n, inputs.seed, readjust=False)[TEMPERATURE]
    readjusted_samples = sample_grid(model, (TEMPERATURE,), n, inputs.seed, readjust=True)[TEMPERATURE]
    as_drawn = class_probabilities(classifier.net, drawn)
    readjusted = class_probabilities(classifier.net, readjusted_samples)
    readings: dict[str, Any] = {"real_test_images": readout(classifier.test_probabilities),
                                "model_bn": readout(as_drawn), "readjusted_bn": readout(readjusted)}
    top = readjusted.max(axis=1)
    least = np.argsort(top, kind="stable")[:SHOWN]
    numbers: dict[str, Any] = {
        "sizes": {"samples": n, **classifier.sizes},
        "temperature": TEMPERATURE,
        "noise_seed": inputs.seed,
        "classifier_test_accuracy": classifier.test_accuracy,
        **readings,
        "definitions": {
            "mean_top_probability": "mean over the images of the classifier's largest class probability",
            f"fraction_above_{CONFIDENT}": f"fraction of the images whose largest class probability is above "
                                           f"{CONFIDENT}",
            "class_counts": "number of images the classifier reads as each class, 0 first",
        },
    }
    return Result(numbers, _figure(numbers, readjusted_samples[least], top[least]))


def _figure(numbers: dict[str, Any], least: np.ndarray, least_top: np.ndarray) -> Figure:
    fig = Figure(figsize=(13, 4))
    bars, curves, grid = fig.subplots(1, 3, gridspec_kw={"width_ratios": [1.2, 1, 1.2]})
    names = {"real_test_images": "real test images", "model_bn": "samples, model's BN",
             "readjusted_bn": "samples, BN re-estimated"}
    width = 0.8 / len(names)
    for k, (key, label) in enumerate(names.items()):
        counts = np.asarray(numbers[key]["class_counts"], dtype=float)
        bars.bar(np.arange(len(counts)) + (k - 1) * width, counts / counts.sum(), width, label=label)
        curves.bar(k, numbers[key]["mean_top_probability"], 0.6,
                   yerr=numbers[key]["mean_top_probability_stderr"] or 0.0)
    bars.set(xlabel="class read by the classifier", ylabel="fraction of the images", xticks=range(len(counts)),
             title="classes")
    bars.legend(fontsize=8)
    curves.set(xticks=range(len(names)), ylabel="mean top-class probability", ylim=(0.5, 1.0),
               title=f"confidence (classifier test accuracy {numbers['classifier_test_accuracy']:.3f})")
    curves.set_xticklabels([label.replace(", ", ",\n") for label in names.values()], fontsize=8)
    show_image(grid, image_grid(least, 8, zoom=2),
               f"the {len(least)} least confident samples (BN re-estimated)\n"
               f"top-class probability {least_top.min():.2f} to {least_top.max():.2f}")
    fig.suptitle(f"{numbers['sizes']['samples']} samples at temperature {numbers['temperature']} "
                 f"(noise seed {numbers['noise_seed']})")
    fig.tight_layout()
    return fig


def section(numbers: dict[str, Any]) -> str:
    """A table of the three readings."""
    rows = ""
    for key, label in (("real_test_images", "real test images"), ("model_bn", "samples, model's BatchNorm"),
                       ("readjusted_bn", "samples, BatchNorm re-estimated")):
        r = numbers[key]
        error = r["mean_top_probability_stderr"]
        rows += (f"| {label} | {r['mean_top_probability']:.3f}" + (f" ± {error:.3f}" if error is not None else "")
                 + f" | {r[f'fraction_above_{CONFIDENT}']:.3f} | {r['classes_present']} | "
                 f"{', '.join(map(str, r['class_counts']))} |\n")
    return (f"How a classifier trained on the training split (test accuracy "
            f"{numbers['classifier_test_accuracy']:.3f}) reads {numbers['sizes']['samples']} samples at temperature "
            f"{numbers['temperature']}, and the real test images.\n\n"
            f"| images | mean top-class probability | above {CONFIDENT} | classes present | images per class |\n"
            "|---|---|---|---|---|\n" + rows)
