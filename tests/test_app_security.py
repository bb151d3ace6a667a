"""The app as anyone on the network sees it, through raw HTTP requests (no gradio_client), served as it runs by
default, on every bundled model (two stand-ins: tests/test_app.py's ``fake_bundled_models``): it opens only the
files it received as uploads and its own examples (every other path gets the same plain refusal, whether or not it
exists); a request chooses its model only by one of the menu's names; the same request gets the same answer under
concurrent load; inputs that only the API can send get their own messages; a fuzz test sends every endpoint
malformed payloads; the log shows nvae_hub's messages only; a taken port is a usage error before the model loads.

Every request goes to 127.0.0.1 with a timeout, and every loop of requests is bounded in count and time.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import re
import socket
import struct
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
import torch
from PIL import Image, ImageDraw
from test_analysis_app import write_analyses
from test_app import ROOT, app, digit, free_port, shared_cache, start_bundled_app, tiny_model_dir

from nvae_hub import NVAE, NVAEConfig

META = {"_type": "gradio.FileData"}  # what marks a dict as a file for Gradio
REQUEST_TIMEOUT = 60  # seconds, per HTTP request (the 2-core CI machine is sometimes slow)
DEADLINE = 240  # seconds for all the requests of one test
ERROR_FORMS = re.compile("|".join([  # the forms of the app's messages about bad input
    re.escape(app.NOT_AN_UPLOAD), r"must be (a|an|true)\b", r"takes \d+ inputs", "No image given",
    "The drawing is empty", r"Choose A or B", "cannot read its inputs", r"is not an image that can be read",
    r"; choose one of: mnist\.", "The model must be one of mnist, color, got ",
]))
MODELS_REFUSED = "The model must be one of mnist, color, got "


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def png_declaring(width: int, height: int) -> bytes:
    """A small PNG file whose header declares ``width`` x ``height`` pixels (a decompression bomb's header)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grayscale
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))


class Api:
    """A served app's HTTP API, used the way any client (or attacker) can: uploads and calls, raw."""

    def __init__(self, url: str) -> None:
        self.http = httpx.Client(base_url=f"{url}gradio_api", timeout=REQUEST_TIMEOUT)

    def upload(self, name: str, content: bytes) -> dict[str, Any]:
        """POST /gradio_api/upload; the file payload that names the upload."""
        response = self.http.post("/upload", files=[("files", (name, content))])
        response.raise_for_status()
        return {"path": response.json()[0], "orig_name": name, "meta": META}

    def post(self, endpoint: str, body: bytes) -> httpx.Response:
        return self.http.post(f"/call/{endpoint}", content=body, headers={"content-type": "application/json"})

    def call(self, endpoint: str, data: Any) -> SimpleNamespace:
        """POST /gradio_api/call/<endpoint> with ``{"data": data}`` (NaN and infinities as JSON extensions, like
        Python's json), then read the event stream to its end. Returns ok=True and the outputs, or ok=False and the
        error message (None if the app gave none)."""
        posted = self.post(endpoint, json.dumps({"data": data}).encode())
        assert posted.status_code == 200, posted.text
        stream = self.http.get(f"/call/{endpoint}/{posted.json()['event_id']}")
        events = [(kind, json.loads(data)) for kind, data in re.findall(r"^event: (\w+)\ndata: (.*)$", stream.text,
                                                                        re.MULTILINE) if kind != "heartbeat"]
        assert events and events[-1][0] in ("complete", "error"), stream.text[:500]
        kind, data = events[-1]
        if kind == "complete":
            return SimpleNamespace(ok=True, outputs=data, message=None)
        return SimpleNamespace(ok=False, outputs=None, message=(data or {}).get("error"))

    def page_value(self, elem_id: str) -> Any:
        """The initial value of the page's component ``elem_id``, as the page gets it (GET /config)."""
        config = self.http.get("/../config").json()
        return next(c["props"]["value"] for c in config["components"] if c.get("props", {}).get("elem_id") == elem_id)

    def examples(self, elem_id: str) -> list[Any]:
        """The file payloads of the examples inside the page's block ``elem_id``, as the page gets them."""
        config = self.http.get("/../config").json()
        components = {c["id"]: c for c in config["components"]}
        block = next(i for i, c in components.items() if c.get("props", {}).get("elem_id") == elem_id)

        def children(node: dict[str, Any]) -> list[int]:
            if node["id"] == block:
                return [child["id"] for child in node.get("children", [])]
            return [i for child in node.get("children", []) for i in children(child)]

        dataset = next(components[i] for i in children(config["layout"]) if components[i]["type"] == "dataset")
        return [sample[0] for sample in dataset["props"]["samples"]]


def bits_per_dim(answer: SimpleNamespace) -> str:
    """The bits/dim a reconstruction reports (as the page shows it)."""
    assert answer.ok, answer.message
    return re.search(r"\*\*([\d.]+) bits/dim\*\*", answer.outputs[-1]).group(1)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory):
    cache = shared_cache(tmp_path_factory)
    analyses = tmp_path_factory.mktemp("analyses")
    write_analyses(analyses / "mnist")  # so that the Analyses tab and its endpoint are there
    demo, url = start_bundled_app(cache, analyses_dir=analyses)
    try:
        api = Api(url)
        drawing = Image.new("L", (280, 280), 255)
        ImageDraw.Draw(drawing).line((140, 30, 140, 250), fill=0, width=22)
        yield SimpleNamespace(api=api, cache=cache, a=api.upload("a.png", png_bytes(digit())),
                              b=api.upload("b.png", png_bytes(digit().rotate(90))),
                              drawing=api.upload("drawing.png", png_bytes(drawing)))
        api.http.close()
    finally:
        demo.close()


def sketch(composite: Any) -> dict[str, Any]:
    """The sketchpad's value with the given composite picture, as the page sends it."""
    return {"background": None, "layers": [], "composite": composite, "id": None}


def image_calls(payload: Any, good: dict[str, Any], model: str = "mnist") -> dict[str, list[Any]]:
    """A call of every endpoint that opens images, ``payload`` in the place of one image (``good`` elsewhere)."""
    return {"reconstruct": [payload, False, model], "reconstruct_drawing": [sketch(payload), True, model],
            "swap": [good, payload, "B", "A", model], "interpolate": [payload, good, 4, model]}


# ---------------------------------------------------------------------- 1: only uploads and the app's examples
def test_paths_that_were_not_uploaded_all_get_the_same_refusal(served, tmp_path):
    api, deadline = served.api, time.monotonic() + DEADLINE
    outside = tmp_path / "digit.png"  # a real image on the server, never uploaded
    digit().save(outside)
    upload_folder = Path(served.a["path"]).parent.parent
    sample = api.call("sample", [0.7, 2, 0, False, 0.7, 0.7, "mnist"])
    output = sample.outputs[0]["path"]  # a file the app wrote in Gradio's folder, never uploaded
    assert Path(output).is_file() and Path(output).is_relative_to(upload_folder)
    paths = {
        "an image outside the upload folder": str(outside),
        "a text file": "/etc/passwd",
        "the app's source": str(ROOT / "app.py"),
        "the model's weights": str(tiny_model_dir(served.cache) / "model.safetensors"),
        "a missing file": str(tmp_path / "missing.png"),
        "a missing folder": "/nonexistent/x.png",
        "a folder": str(upload_folder),
        "out of the upload folder with ..": f"{upload_folder}/../../etc/passwd",
        "relative": "../../../../etc/passwd",
        "an output of the app": output,
        "an example's own file, not the copy the page shows": str(next(
            (served.cache / "app-examples").glob("*/example-0.png"))),
        "a device": "/dev/zero",
        "a URL Gradio would fetch": "http://127.0.0.1:1/x.png",
    }
    for what, path in paths.items():
        for payload in ({"path": path, "meta": META}, {"path": path, "orig_name": "x.png"}):
            for endpoint, data in image_calls(payload, served.a).items():
                assert time.monotonic() < deadline, "the requests took too long"
                answer = api.call(endpoint, data)
                assert not answer.ok and answer.message == app.NOT_AN_UPLOAD, (what, endpoint, payload, answer)

    # The same image, uploaded, is opened; so are the app's examples, as the page shows them, of every model.
    assert api.call("reconstruct", [api.upload("digit.png", outside.read_bytes()), False, "mnist"]).ok
    assert api.call("swap", [api.page_value("swap-a"), api.page_value("swap-b"), "B", "A", "color"]).ok
    for model in ("mnist", "color"):
        for example in api.examples(f"reconstruct-examples-{model}")[:2] + api.examples(f"swap-b-examples-{model}")[:1]:
            assert api.call("reconstruct", [example, False, "color"]).ok


# ---------------------------------------------------------------------- the model a request chooses
def hostile_models(served) -> list[Any]:
    """Values for the model input that name no model of the menu: paths (existing or not), look-alikes, types."""
    model_folder = str(tiny_model_dir(served.cache))  # the folder the 'mnist' stand-in was loaded from
    return [model_folder, f"{model_folder}/", "/etc/passwd", "/nonexistent", "../mnist", "mnist/../color", "./mnist",
            "MNIST", "mnist ", "user/repo", "https://huggingface.co/user/repo", "", "\x00", "<b>mnist</b>", None, 3,
            True, ["mnist"], {"name": "mnist"}]


def test_a_request_chooses_its_model_only_by_a_name_on_the_menu(served):
    api, deadline = served.api, time.monotonic() + DEADLINE
    calls = {"sample": [0.7, 2, 0, False, 0.7, 0.7], "explore": [0.7, 0, 2], "interpolate": [served.a, served.b, 4],
             **{endpoint: data[:-1] for endpoint, data in image_calls(served.a, served.b).items()
                if endpoint != "interpolate"}}
    for endpoint, data in calls.items():
        for model in hostile_models(served):
            assert time.monotonic() < deadline, "the requests took too long"
            answer = api.call(endpoint, [*data, model])
            assert not answer.ok and answer.message.startswith(MODELS_REFUSED), (endpoint, model, answer.message)
            assert "<b>" not in answer.message  # shown as text, not as HTML
        answer = api.call(endpoint, [*data, {"path": "/etc/passwd", "meta": META}])  # a file where the model goes
        assert not answer.ok and answer.message == app.NOT_AN_UPLOAD
        assert api.call(endpoint, [*data, "color"]).ok, endpoint


def test_a_request_without_a_model_gets_the_default_one(served):
    api = served.api
    before_the_menu = bits_per_dim(api.call("reconstruct", [served.a, False]))
    assert before_the_menu == bits_per_dim(api.call("reconstruct", [served.a, False, "mnist"]))
    assert before_the_menu != bits_per_dim(api.call("reconstruct", [served.a, False, "color"]))
    for endpoint, data in normal_requests(served).items():
        if endpoint != "analyses":
            assert api.call(endpoint, data[:-1]).ok, endpoint


# ---------------------------------------------------------------------- 2: the same request, the same answer
def test_the_same_request_gets_the_same_answer_under_concurrent_load(served):
    api, data = served.api, [served.a, False]
    alone = [bits_per_dim(api.call("reconstruct", data)) for _ in range(3)]
    assert len(set(alone)) == 1
    with ThreadPoolExecutor(max_workers=12) as pool:  # 12 at once; the app runs 2 at a time, the rest wait
        concurrent = list(pool.map(lambda _: bits_per_dim(api.call("reconstruct", data)), range(12)))
    assert concurrent == alone[:1] * 12


def test_nll_draws_its_samples_with_the_generator_given():
    torch.manual_seed(0)
    model = NVAE(NVAEConfig.preset("tiny")).eval()
    x = (torch.rand(2, 1, 16, 16) > 0.5).float()
    state = torch.get_rng_state()
    first = model.bits_per_dim(x, 4, generator=torch.Generator().manual_seed(1))
    assert torch.equal(torch.get_rng_state(), state), "the global generator was used"
    again = model.bits_per_dim(x, 4, generator=torch.Generator().manual_seed(1))
    other = model.bits_per_dim(x, 4, generator=torch.Generator().manual_seed(2))
    assert torch.equal(first, again) and not torch.equal(first, other)


# ---------------------------------------------------------------------- 3: inputs only the API can send
def test_api_only_inputs_get_their_own_messages(served):
    api = served.api
    for data, message in [
        (["abc", 4, 0, False, 0.7, 0.7], "The temperature must be a number, got 'abc'."),
        ([0.7, 4, 0, True, None, 0.7], "The temperature of scale 0 must be a number, got None."),
        ([0.7, 4, 0, "yes", 0.7, 0.7], "Use per-scale temperatures must be true or false, got 'yes'."),
    ]:
        answer = api.call("sample", data)
        assert not answer.ok and answer.message == message
    truncated = png_bytes(digit(64))[:-40]
    for name, content, message in [
        ("notes.txt", b"not an image", "The drawing is not an image that can be read (PNG, JPEG, WEBP, GIF, BMP, "
                                       "TIFF)."),
        ("cut.png", truncated, "The drawing is corrupt or truncated and cannot be decoded"),
        ("empty.png", b"", "The drawing is an empty file (0 bytes), not an image."),
        ("bomb.png", png_declaring(60000, 60000), "The drawing is far too large"),
        ("big.png", png_declaring(5000, 5000), "The drawing is 5000x5000 pixels, too large"),
    ]:
        answer = api.call("reconstruct_drawing", [sketch(api.upload(name, content)), True])
        assert not answer.ok and answer.message.startswith(message), (name, answer.message)
    answer = api.call("reconstruct_drawing", ["abc", True])
    assert answer.message == "Draw must be a sketchpad value (a dict with a 'composite' image) or null, got 'abc'."
    assert api.call("reconstruct_drawing", [sketch(served.drawing), True]).ok


# ---------------------------------------------------------------------- fuzz: every endpoint, malformed payloads
def normal_requests(served) -> dict[str, list[Any]]:
    """One good request for each of the app's endpoints."""
    return {"sample": [0.7, 4, 0, False, 0.7, 0.7, "color"], "explore": [0.7, 0, 2, "color"],
            "reconstruct": [served.a, False, "color"], "reconstruct_drawing": [sketch(served.drawing), True, "color"],
            "swap": [served.a, served.b, "B", "A", "color"], "interpolate": [served.a, served.b, 4, "color"],
            "analyses": ["mnist"]}


def malformed_values(served) -> list[Any]:
    """Values that are wrong in every input of every endpoint: types, sizes, encodings and paths."""
    upload = served.a["path"]
    return [
        None, "abc", "", "0.7", "x" * 100_000, "\udcff\u202e\x00", [], [[[[[]]]]], list(range(10_000)), {}, {"a": 1},
        float("nan"), float("inf"), -float("inf"), -1, 10**30, 1e308,
        {"path": "/etc/passwd", "meta": META}, {"path": "/etc/passwd"}, {"path": "/nonexistent.png", "meta": META},
        {"path": "../../../../etc/passwd", "meta": META}, {"path": f"{upload}/../../../../etc/shadow", "meta": META},
        {"path": "http://127.0.0.1:1/x.png", "meta": META}, {"path": "file:///etc/passwd", "meta": META},
        {"path": "/proc/self/environ", "meta": META}, {"path": 42, "meta": META}, {"path": "/tmp/\x00.png"},
        {"path": None, "url": "data:image/png;base64,iVBORw0KGgo=", "meta": META},
        {"path": upload, "size": "huge", "meta": META}, {"path": upload, "orig_name": ["x"], "meta": META},
        {"nested": [{"path": "/etc/hostname", "meta": META}]},
    ]


def test_fuzz_every_endpoint_with_malformed_payloads(served):
    api, deadline = served.api, time.monotonic() + DEADLINE
    values = malformed_values(served)
    bodies = [b"not json", b"\xff\xfe\x00", b'{"data": "x"}', b"{}", b"[1]", b'{"data": [1, 2']
    for endpoint, good in normal_requests(served).items():
        # Too few and too many inputs (one too few is a request without the model, from before the model menu).
        payloads = [[], good[:-2], [*good, 0]]
        # Each malformed value once, in turn in each input (the image inputs get them all in the path test above).
        payloads += [[*good[:i % len(good)], value, *good[i % len(good) + 1:]] for i, value in enumerate(values)]
        if endpoint == "reconstruct_drawing":
            payloads += [[sketch(value), True] for value in values[:5] + values[17:21]]
        assert len(payloads) + len(bodies) >= 30
        with ThreadPoolExecutor(max_workers=4) as pool:  # a few at a time, well within the app's queue of 32
            answers = list(pool.map(api.call, [endpoint] * len(payloads), payloads))
        assert time.monotonic() < deadline, "the fuzz requests took too long"
        for data, answer in zip(payloads, answers, strict=True):
            assert not answer.ok, (endpoint, data)
            assert isinstance(answer.message, str) and len(answer.message) < 500, (endpoint, data, answer.message)
            assert ERROR_FORMS.search(answer.message), (endpoint, data, answer.message)
        for body in bodies:  # not even a request: FastAPI says what is wrong with it
            response = api.post(endpoint, body)
            assert response.status_code in (400, 422) and response.json()["detail"], (endpoint, body, response.text)
        assert api.call(endpoint, good).ok, f"{endpoint} no longer answers a normal request"


# ---------------------------------------------------------------------- 5 and 16: the command line
@contextlib.contextmanager
def plain_logging():
    """Logging as in a fresh process (no handlers, not even pytest's), restored afterwards."""
    loggers = [logging.getLogger(), logging.getLogger("nvae_hub")]
    saved = [(logger, logger.level, logger.handlers[:], logger.propagate) for logger in loggers]
    for logger in loggers:
        logger.handlers.clear()
    try:
        yield
    finally:
        for logger, level, handlers, propagate in saved:
            logger.setLevel(level)
            logger.handlers[:] = handlers
            logger.propagate = propagate


def test_the_log_shows_nvae_hub_messages_only(monkeypatch, capsys):
    def build_app(*args, **kwargs):  # what a first start logs: the ONNX exporter's ~200 INFO lines, and the app's
        logging.getLogger("onnx_ir.passes.common.initializer_deduplication").info("Deduplicated initializer")
        logging.getLogger("onnxscript.optimizer._constant_folding").info("Skipping constant folding")
        logging.getLogger("nvae_hub.app").info("runtime: onnxruntime")
        return None

    monkeypatch.setattr(app, "build_app", build_app)
    monkeypatch.setattr(app, "launch", lambda *args, **kwargs: None)
    with plain_logging():
        app.main(["--port", str(free_port())])
    log = capsys.readouterr().err
    assert "nvae_hub.app INFO: runtime: onnxruntime" in log
    assert "Deduplicated" not in log and "constant folding" not in log
    assert log.count("runtime: onnxruntime") == 1


def test_a_taken_port_is_a_usage_error_before_the_model_loads(monkeypatch, capsys):
    def build_app(*args, **kwargs):
        raise AssertionError("the model was loaded before the port was checked")

    monkeypatch.setattr(app, "build_app", build_app)
    monkeypatch.delenv("GRADIO_SERVER_PORT", raising=False)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(SystemExit) as exit_info:
            app.main(["--host", "127.0.0.1", "--port", str(port)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage:") and f"cannot serve on 127.0.0.1:{port}" in err
    assert "Choose another port with --port" in err and "GRADIO_SERVER_PORT" not in err
    suggested = int(re.search(r"e\.g\. --port (\d+)", err).group(1))
    assert app.can_serve("127.0.0.1", suggested) is None
