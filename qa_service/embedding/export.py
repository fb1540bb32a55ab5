"""Export a sentence-transformers model to the ONNX graph the serving encoder runs (torch-bound, index time only).

``prepare_encoder`` turns a ``SentenceTransformerEmbedder`` into ``builds/<id>/model/model.onnx`` (or
``model.int8.onnx``: transformer, pooling and L2 norm in one graph, fused by onnxruntime's optimizer) plus the
model's ``tokenizer.json``, checked against sentence-transformers before use, and the manifest's ``encoder``
entry. When export is impossible or disagrees, the build keeps sentence-transformers and says so
(docs/decisions/onnx-export-and-fusion.md, docs/decisions/int8-precision.md).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from ..files import sha256_file, write_text_atomically
from . import Embedder
from .export_cache import reuse_build_export
from .models import model_files_digest
from .onnx_encoder import (
    EXPORT_VERSION,
    INDEXING_THREADS,
    INPUTS,
    MODEL_DIR,
    MODEL_FILES,
    OUTPUT,
    TOKENIZER_FILE,
    TOKENS,
    OnnxEmbedder,
    encoder_precision,
)
from .torch_encoder import SentenceTransformerEmbedder, token_pooling_of

logger = logging.getLogger(__name__)

OPSET = 17
# Smallest cosine to sentence-transformers, over the probe texts, that an export must reach to be used.
MIN_COSINE = {"fp32": 0.9999, "int8": 0.97}
# onnxruntime's transformer optimizer knows these encoder families' attention/normalisation patterns.
FUSABLE_MODEL_TYPES = {"bert": "bert", "distilbert": "bert", "roberta": "bert", "xlm-roberta": "bert",
                       "mpnet": "bert", "electra": "bert"}
FUSION_MIN_COSINE = 0.99999  # fused vs unfused graph on the export's sample; else the unfused graph is kept

PROBE_TEXTS = (
    "What did the minister say about the ceasefire talks?",
    "Hamas",
    "",
    "  Leading and trailing spaces, UPPER and lower CASE, numbers 1,234.5 and 7 October 2023.  ",
    "Naïve café résumé — “quotes”, ‘apostrophes’ and emoji 🙂 in one line.",
    "A long text that must be truncated exactly where the model truncates it. " * 60,
)


def model_fingerprint(embedder: SentenceTransformerEmbedder) -> str:
    """Return a digest of what the export depends on: weights, tokenizer, module layout, lengths, exporter."""
    import torch

    model = embedder.model
    h = hashlib.sha256()
    head = {"export_version": EXPORT_VERSION, "opset": OPSET, "max_seq_length": embedder.max_seq_length,
            "modules": repr(model), "tokenizer": model.tokenizer.backend_tokenizer.to_str()
            if getattr(model.tokenizer, "is_fast", False) else None}
    h.update(json.dumps(head, sort_keys=True, default=str).encode("utf-8"))
    for key, tensor in model.state_dict().items():
        tensor = tensor.detach().cpu().contiguous().reshape(-1)
        h.update(f"{key}|{tensor.dtype}|{tensor.numel()}".encode("utf-8"))
        h.update(tensor.view(torch.uint8).numpy())
    return h.hexdigest()


def prepare_encoder(embedder: Embedder, quantize: str, build_dir: Path, builds: Path,
                    passages: Sequence[str] = ()) -> tuple[Embedder, dict]:
    """Return the embedder that must encode this build's passages and its manifest ``encoder`` entry.

    For a ``SentenceTransformerEmbedder``: export (or reuse an earlier build's export) into ``build_dir/model``
    and return an ``OnnxEmbedder`` for it, checked against sentence-transformers on probe texts and a sample of
    ``passages``. Other embedders (fakes, custom ones) are returned unchanged.

    Args:
        quantize: "none" (fp32) or "int8".
        builds: the index's ``builds`` folder, searched for an earlier export of the same model.
    """
    precision = encoder_precision(quantize)
    if not isinstance(embedder, SentenceTransformerEmbedder):
        return embedder, {"backend": getattr(embedder, "backend", "external"), "class": type(embedder).__name__}
    started = time.perf_counter()
    folder = Path(build_dir) / MODEL_DIR
    try:
        folder.mkdir()
        fingerprint = model_fingerprint(embedder)
        previous = [p for p in Path(builds).iterdir() if p.is_dir()] if Path(builds).is_dir() else []
        entry = reuse_build_export(previous, fingerprint, precision, folder)
        if entry is not None:
            onnx = OnnxEmbedder(folder / MODEL_FILES[entry["precision"]], folder / TOKENIZER_FILE, name=embedder.name,
                                dimension=embedder.dimension, max_seq_length=entry["max_seq_length"],
                                input_names=entry["inputs"], pad_id=entry["pad_id"], precision=entry["precision"],
                                threads=INDEXING_THREADS, token_pooling=entry.get("token_pooling"))
            entry.update(quantize=quantize, model_files=model_files_digest(embedder.path))
            logger.info("reused the ONNX encoder of build %s (%.1f s)", entry["reused_from"],
                        time.perf_counter() - started)
            return onnx, entry
        # int8 is quantised from the fp32 graph, so an earlier fp32 export of the same model saves the export.
        base = reuse_build_export(previous, fingerprint, "fp32", folder) if precision == "int8" else None
        if base is not None:
            inputs, pad_id, checked = base["inputs"], base["pad_id"], base.get("agreement_min_cosine")
        else:
            inputs, pad_id, fused = _export_fp32(embedder, folder / MODEL_FILES["fp32"])
            write_text_atomically(folder / TOKENIZER_FILE, embedder.model.tokenizer.backend_tokenizer.to_str())
            checked = None
        onnx, entry = _finish(embedder, precision, folder, inputs, pad_id, passages, checked)
        entry["fused"] = base.get("fused", {}) if base is not None else fused
        entry.update(fingerprint=fingerprint, quantize=quantize, reused_from=None,
                     model_files=model_files_digest(embedder.path))
        logger.info("exported %s to ONNX %s (min cosine to sentence-transformers %.6f, %.1f s)", embedder.name,
                    entry["precision"], entry["agreement_min_cosine"], time.perf_counter() - started)
        return onnx, entry
    except Exception as exc:
        shutil.rmtree(folder, ignore_errors=True)
        logger.warning("Could not export %s to ONNX (%s: %s); passages and questions will be encoded with "
                       "sentence-transformers on torch instead (slower start-up and queries).",
                       embedder.name, type(exc).__name__, exc)
        return embedder, {"backend": "sentence-transformers", "precision": "fp32", "quantize": quantize,
                          "max_seq_length": embedder.max_seq_length, "reason": f"{type(exc).__name__}: {exc}"}


def _probe_texts(passages: Sequence[str], n: int = 8) -> list[str]:
    if not passages:
        return list(PROBE_TEXTS)
    picks = np.linspace(0, len(passages) - 1, min(n, len(passages)), dtype=int)
    return list(PROBE_TEXTS) + [passages[i] for i in picks]


def _finish(embedder, precision: str, folder: Path, inputs: Sequence[str], pad_id: int,
            passages: Sequence[str], fp32_agreement: float | None = None) -> tuple[OnnxEmbedder, dict]:
    """Check the fp32 graph in ``folder`` against the model, quantise it if asked; return it and its entry.

    Args:
        fp32_agreement: the fp32 graph's recorded agreement when it comes from an earlier build (not re-checked).
    """
    import torch

    fp32 = folder / MODEL_FILES["fp32"]
    probes = _probe_texts(passages)
    reference = embedder.encode(probes, batch_size=16)

    def load(path: Path, precision_: str) -> OnnxEmbedder:
        return OnnxEmbedder(path, folder / TOKENIZER_FILE, name=embedder.name, dimension=embedder.dimension,
                            max_seq_length=embedder.max_seq_length, input_names=inputs, pad_id=pad_id,
                            precision=precision_, threads=INDEXING_THREADS,
                            token_pooling=token_pooling_of(embedder.model))

    def agreement_of(candidate: OnnxEmbedder) -> float:
        return float(np.min(np.sum(candidate.encode(probes, batch_size=16) * reference, axis=1)))

    onnx = None
    agreement = fp32_agreement
    if agreement is None:
        onnx = load(fp32, "fp32")
        agreement = agreement_of(onnx)
        if agreement < MIN_COSINE["fp32"]:
            raise ValueError(f"the exported graph disagrees with sentence-transformers (min cosine {agreement:.6f})")
    if precision == "int8":
        int8 = folder / MODEL_FILES["int8"]
        _quantize_int8(fp32, int8)
        candidate = load(int8, "int8")
        int8_agreement = agreement_of(candidate)
        if int8_agreement >= MIN_COSINE["int8"]:
            fp32.unlink()
            onnx, agreement = candidate, int8_agreement
        else:
            logger.warning("The int8 encoder of %s agrees too little with the model (min cosine %.4f < %.2f); "
                           "keeping fp32.", embedder.name, int8_agreement, MIN_COSINE["int8"])
            int8.unlink()
    if onnx is None:
        onnx = load(fp32, "fp32")
    model_file = Path(onnx.model_file)
    entry = {
        "backend": "onnx",
        "precision": onnx.precision,
        "file": f"{MODEL_DIR}/{model_file.name}",
        "sha256": sha256_file(model_file),
        "tokenizer": f"{MODEL_DIR}/{TOKENIZER_FILE}",
        "tokenizer_sha256": sha256_file(folder / TOKENIZER_FILE),
        "max_seq_length": embedder.max_seq_length,
        "inputs": list(inputs),
        "pad_id": pad_id,
        "output": OUTPUT,
        "token_output": TOKENS,
        "token_pooling": onnx.token_pooling,
        "opset": OPSET,
        "export_version": EXPORT_VERSION,
        "exported_with": {"torch": torch.__version__.split("+")[0]},
        "agreement_min_cosine": round(agreement, 7),
    }
    return onnx, entry


def _export_fp32(embedder, path: Path) -> tuple[list[str], int, dict]:
    """Export the sentence-transformers model (all its modules, then L2 norm) to ``path``, fused for onnxruntime.

    The model was loaded with plain ("eager") attention (``torch_encoder.EAGER``), whose traced graph
    onnxruntime's optimizer fuses (``_fuse``). Returns the graph's input names, the tokenizer's padding id and
    the fused operators ({} when none).
    """
    import warnings

    import torch

    model = embedder.model
    tokenizer = model.tokenizer
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("the model has no fast (Rust) tokenizer to serve with")
    # Two texts of different lengths, so the traced graph takes the attention-mask path (never a shortcut
    # for unpadded batches) and both axes are seen to vary.
    sample = tokenizer(["A short question?", "A longer sentence, so that this batch of two needs padding."],
                       padding=True, truncation=True, max_length=embedder.max_seq_length, return_tensors="pt")
    names = [name for name in INPUTS if name in sample]
    unknown = set(sample) - set(names)
    if unknown or "input_ids" not in names or "attention_mask" not in names:
        raise ValueError(f"the tokenizer returns inputs this encoder does not feed: {sorted(unknown)}")

    class Wrapped(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, *tensors):
            features = self.inner(dict(zip(names, tensors)))
            return (torch.nn.functional.normalize(features["sentence_embedding"], p=2, dim=1),
                    features["token_embeddings"])

    wrapped = Wrapped(model).eval()
    axes = {name: {0: "batch", 1: "sequence"} for name in names}
    axes[OUTPUT] = {0: "batch"}
    axes[TOKENS] = {0: "batch", 1: "sequence"}
    inputs = tuple(sample[name] for name in names)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer and deprecation chatter; agreement is checked afterwards
        torch.onnx.export(wrapped, inputs, str(path), dynamo=False, input_names=names, output_names=[OUTPUT, TOKENS],
                          dynamic_axes=axes, opset_version=OPSET, do_constant_folding=True)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    fused = _fuse(path, _transformer_config(model), {name: t.numpy() for name, t in zip(names, inputs)})
    return names, int(pad_id), fused


def _transformer_config(model):
    """The Hugging Face config of the sentence-transformers model's transformer module, or None."""
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "num_attention_heads"):
            return config
    return None


def _fuse(path: Path, config, sample: dict) -> dict:
    """Replace ``path`` by onnxruntime's fused transformer graph when that computes the same vectors.

    Attention, skip + layer normalisation, bias + GELU and the embedding layer become one operator each, which
    costs less CPU per question (docs/decisions/onnx-export-and-fusion.md). Returns the fused operator counts;
    {} (graph unchanged) when the model family is unknown to the optimizer, nothing fused, or the graphs disagree.
    """
    kind = FUSABLE_MODEL_TYPES.get(getattr(config, "model_type", None))
    if kind is None:
        return {}
    candidate = path.with_name(path.stem + ".fused.onnx")
    try:
        import onnxruntime as ort
        from onnxruntime.transformers.optimizer import optimize_model

        optimized = optimize_model(str(path), model_type=kind, num_heads=int(config.num_attention_heads),
                                   hidden_size=int(config.hidden_size), opt_level=0)
        fused = {op: n for op, n in optimized.get_fused_operator_statistics().items() if n}
        if not fused.get("Attention"):
            return {}
        optimized.save_model_to_file(str(candidate))
        options = ort.SessionOptions()
        options.log_severity_level = 3
        outputs = [ort.InferenceSession(str(p), options, providers=["CPUExecutionProvider"]).run(None, sample)[0]
                   for p in (path, candidate)]
        agreement = float(np.min(np.sum(outputs[0] * outputs[1], axis=1)))
        if agreement >= FUSION_MIN_COSINE:
            candidate.replace(path)
            return fused
        logger.info("kept the unfused ONNX graph: the fused one agrees only to cosine %.6f", agreement)
    except Exception as exc:  # an optimizer that cannot handle the graph leaves a correct, slower one
        logger.info("kept the unfused ONNX graph: %s: %s", type(exc).__name__, exc)
    finally:
        candidate.unlink(missing_ok=True)
    return {}


def _quantize_int8(source: Path, target: Path) -> None:
    """Quantise ``source`` to dynamic int8 with per-channel weights (docs/decisions/int8-precision.md)."""
    from onnx import TensorProto
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # onnxruntime logs a pre-processing hint with ``logging.warning``, which would also configure the root logger
    # of our host process: drop the hint, and give root a handler meanwhile.
    root = logging.getLogger()
    hint = _DropLogRecords("pre-processing before quantization")
    placeholder = logging.NullHandler() if not root.handlers else None
    root.addFilter(hint)
    if placeholder:
        root.addHandler(placeholder)
    try:
        # The fused graph's contrib operators (Attention, ...) have no type in ONNX's shape inference: say float.
        quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8, per_channel=True,
                         extra_options={"DefaultTensorType": TensorProto.FLOAT})
    finally:
        root.removeFilter(hint)
        if placeholder:
            root.removeHandler(placeholder)


class _DropLogRecords(logging.Filter):
    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()
