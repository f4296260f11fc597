"""The cached stages of an identification run.

Each stage computes one expensive intermediate, keyed by everything that changes it (see
:mod:`.cache`); the model and tokenizer are loaded only when a stage misses the cache, so a
rerun of a finished run touches neither.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..ablation.capture import Capture, capture_sample
from ..ablation.exact import delta_loss_exact
from ..ablation.fast import delta_loss_fast
from ..ablation.inputs import inputs_from_adapter
from ..ablation.naive import delta_loss_recompute
from ..data.corpus import CorpusSpec, Document, corpus_identity, iter_documents, require_nonempty
from ..data.heldout import PASSAGE_CHARS, heldout_description, select_documents, split_passages
from ..data.sampling import ContextSample, sample_until_rare, sample_windows
from ..data.token_stats import FrequencySplit, TokenCounts, count_tokens
from ..models.loading import (
    LoadedModel,
    ModelSpec,
    check_gguf,
    embedded_model_identity,
    load_model,
    resolve_source,
)
from ..storage import ArrayCache, cache_key, default_cache_dir, ensure_writable_dir
from .config import RunConfig

log = logging.getLogger(__name__)

DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def model_spec(cfg: RunConfig) -> ModelSpec:
    return ModelSpec(
        source=cfg.model,
        revision=cfg.revision,
        gguf_file=cfg.gguf_file,
        dtype=cfg.dtype,
        device=cfg.device,
    )


def _file_identity(path: Path) -> dict[str, Any]:
    st = path.stat()
    return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def spec_identity(cfg: RunConfig) -> dict[str, Any]:
    """Identity of the model (and its tokenizer) without loading it, for cache keys."""
    src = cfg.model
    ident: dict[str, Any] = {"source": src, "revision": cfg.revision, "gguf_file": cfg.gguf_file}
    if src == "embedded":  # every environment holding the same wheel shares the cache
        ident["embedded"] = embedded_model_identity()
        return ident
    path = Path(src).expanduser()
    if path.exists():
        files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file())
        ident["files"] = [_file_identity(p) for p in files if not p.name.startswith(".")]
    return ident


def open_cache(cache_dir: Path | str | None, no_cache: bool) -> ArrayCache:
    """The cache at ``cache_dir`` (default :func:`default_cache_dir`), checked writable."""
    if no_cache:
        return ArrayCache(None)
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    ensure_writable_dir(
        root, "cache directory", "pass --cache-dir DIR (or set RARETOKEN_CACHE), or --no-cache"
    )
    return ArrayCache(root)


def resolved_device(cfg: RunConfig) -> str:
    if cfg.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return cfg.device


@dataclass
class Stages:
    """Runs the stages of one configuration against a cache; loads the model lazily."""

    cfg: RunConfig
    cache: ArrayCache
    progress: bool = True
    timings: dict[str, float] = field(default_factory=dict)
    _loaded: LoadedModel | None = None

    # ----------------------------------------------------------------- identities
    @cached_property
    def model_id(self) -> dict[str, Any]:
        return spec_identity(self.cfg)

    def _corpus_spec(self, source: str) -> CorpusSpec:
        return CorpusSpec(source=source, text_field=self.cfg.text_field)

    @cached_property
    def context_corpus_id(self) -> dict[str, Any]:
        return corpus_identity(self._corpus_spec(self.cfg.corpus))

    @cached_property
    def freq_corpus_id(self) -> dict[str, Any]:
        src = self.cfg.freq_corpus or self.cfg.corpus
        return corpus_identity(self._corpus_spec(src))

    @property
    def shared_corpus(self) -> bool:
        """Frequencies and contexts from one corpus: split its documents in two."""
        return self.cfg.freq_corpus is None or self.cfg.freq_corpus == self.cfg.corpus

    def check_inputs(self) -> None:
        """Resolve the model and corpora without loading them: a missing path, an unknown
        corpus or an unsupported GGUF fails here, before any work or any file is written."""
        src = resolve_source(model_spec(self.cfg))
        if src.kind in ("gguf", "embedded") and src.path is not None:
            check_gguf(src.path)
        _ = self.model_id, self.context_corpus_id, self.freq_corpus_id

    @property
    def heldout_description(self) -> dict[str, Any] | None:
        """How the shared corpus was split into counting and held-out parts (manifest)."""
        if not self.shared_corpus:
            return None
        return heldout_description(self.cfg.heldout_fraction, 0, PASSAGE_CHARS)

    @property
    def _split_key(self) -> dict[str, Any] | None:
        """What the shared-corpus split depends on (part of the counts and sample keys)."""
        if not self.shared_corpus:
            return None
        return {"fraction": self.cfg.heldout_fraction, "passage_chars": PASSAGE_CHARS}

    @property
    def loaded(self) -> LoadedModel:
        if self._loaded is None:
            log.info("loading model %s", self.cfg.model)
            self._loaded = load_model(model_spec(self.cfg))
        return self._loaded

    # ----------------------------------------------------------------- documents
    def _docs(self, which: str) -> Iterator[Document]:
        """The counting (``"freq"``) or context documents; with one corpus serving both, its
        passages are split into a counting and a held-out part (see :mod:`..data.heldout`)."""
        src = (self.cfg.freq_corpus or self.cfg.corpus) if which == "freq" else self.cfg.corpus
        docs: Iterator[Document] = iter_documents(self._corpus_spec(src))
        if self.shared_corpus:
            docs = select_documents(
                split_passages(docs, PASSAGE_CHARS),
                heldout=which != "freq",
                heldout_fraction=self.cfg.heldout_fraction,
                seed=0,
            )
        return require_nonempty(docs, "frequency corpus" if which == "freq" else "corpus")

    # ----------------------------------------------------------------- stages
    def counts_key(self) -> str:
        return cache_key(
            "counts",
            {
                "tokenizer": self.model_id,
                "corpus": self.freq_corpus_id,
                "shared_split": self._split_key,
                "max_tokens": self.cfg.max_count_tokens,
            },
        )

    def token_counts(self) -> tuple[TokenCounts, np.ndarray]:
        """Unigram counts and the token strings of the vocabulary."""
        key = self.counts_key()
        hit = self.cache.load("counts", key)
        if hit is None:
            lm = self.loaded
            vocab = lm.adapter.dims.vocab_size
            counts = count_tokens(
                self._docs("freq"),
                lm.tokenizer,
                vocab_size=vocab,
                progress=self.progress,
                max_tokens=self.cfg.max_count_tokens,
            )
            strings = np.asarray(
                [str(s) for s in lm.tokenizer.convert_ids_to_tokens(list(range(vocab)))],
                dtype=np.str_,
            )
            hit = dict(counts.to_arrays(), token_strings=strings)
            self.cache.save("counts", key, hit)
        strings = hit.pop("token_strings")
        return TokenCounts.from_arrays(hit), strings

    def _sample_key(self, kind: str, split: FrequencySplit | None) -> str:
        cfg = self.cfg
        parts: dict[str, Any] = {
            "tokenizer": self.model_id,
            "corpus": self.context_corpus_id,
            "shared_split": self._split_key,
            "window_len": cfg.window_len,
            "bos": cfg.bos,
            "seed": cfg.seed,
            "max_stream_tokens": cfg.max_stream_tokens,
            "kind": kind,
        }
        if kind == "main":
            parts["mode"] = cfg.sampling
            if cfg.sampling == "windows":
                parts["n_windows"] = cfg.n_windows
            else:
                assert split is not None
                parts["n_rare"] = cfg.n_rare
                parts["rare_ids"] = cache_key("ids", {"ids": split.rare_ids.tolist()})
        else:
            parts["n_windows"] = cfg.reference_windows
        return cache_key("sample", parts)

    def samples(self, split: FrequencySplit) -> tuple[ContextSample, ContextSample, str, str]:
        """The scored context windows and the disjoint reference windows for n̄."""
        cfg = self.cfg
        main_key = self._sample_key("main", split)
        ref_key = self._sample_key("reference", split) + main_key[:8]
        main_hit = self.cache.load("sample", main_key)
        if main_hit is not None:
            main = ContextSample.from_arrays(main_hit)
        else:
            lm = self.loaded
            common: dict[str, Any] = {
                "window_len": cfg.window_len,
                "bos_policy": cfg.bos,
                "seed": cfg.seed,
                "max_context": lm.adapter.dims.max_positions,
                "max_tokens": cfg.max_stream_tokens,
                "progress": self.progress,
            }
            if cfg.sampling == "windows":
                main = sample_windows(
                    self._docs("context"), lm.tokenizer, n_windows=cfg.n_windows, **common
                )
            else:
                main = sample_until_rare(
                    self._docs("context"), lm.tokenizer, split=split, n_rare=cfg.n_rare, **common
                )
            self.cache.save("sample", main_key, main.to_arrays())
        ref_hit = self.cache.load("sample", ref_key)
        if ref_hit is not None:
            ref = ContextSample.from_arrays(ref_hit)
        else:
            lm = self.loaded
            ref = sample_windows(
                self._docs("context"),
                lm.tokenizer,
                n_windows=cfg.reference_windows,
                window_len=cfg.window_len,
                bos_policy=cfg.bos,  # type: ignore[arg-type]
                seed=cfg.seed + 1,
                max_context=lm.adapter.dims.max_positions,
                max_tokens=cfg.max_stream_tokens,
                exclude_offsets_of=main,
                progress=self.progress,
            )
            self.cache.save("sample", ref_key, ref.to_arrays())
        return main, ref, main_key, ref_key

    def _capture_key(self, sample_key: str, kind: str) -> str:
        return cache_key(
            "capture",
            {
                "model": self.model_id,
                "dtype": self.cfg.dtype,
                "device": resolved_device(self.cfg),
                "sample": sample_key,
                "kind": kind,
            },
        )

    def capture(
        self, sample: ContextSample, sample_key: str, *, reference: bool
    ) -> tuple[Capture, str]:
        kind = "reference" if reference else "main"
        key = self._capture_key(sample_key, kind)
        hit = self.cache.load("capture", key)
        if hit is not None:
            return Capture.from_arrays(hit), key
        lm = self.loaded
        n_layers = lm.adapter.dims.n_layers
        desc = "reference windows (n̄)" if reference else "forward passes"
        with tqdm(total=sample.n_windows, desc=desc, unit="win", disable=not self.progress) as bar:
            cap = capture_sample(
                lm.model,
                lm.adapter,
                sample,
                batch_size=self.cfg.batch_size,
                device=resolved_device(self.cfg),
                block_index=None if reference else max(0, n_layers - 2),
                acts_only=reference,
                progress=bar.update,
            )
        self.cache.save("capture", key, cap.to_arrays())
        return cap, key

    def ablation(
        self, cap: Capture, mean_acts: np.ndarray, capture_key: str, ref_key: str
    ) -> np.ndarray:
        """``(n_positions, d_mlp)`` signed loss change of ablating each neuron to its mean."""
        cfg = self.cfg
        key = cache_key(
            "ablation",
            {"capture": capture_key, "reference": ref_key, "method": cfg.method, "tol": cfg.tol},
        )
        hit = self.cache.load("ablation", key)
        if hit is not None:
            return hit["delta"]
        lm = self.loaded
        device = resolved_device(cfg)
        dt = torch.float64 if cfg.dtype == "float64" else torch.float32
        inputs = inputs_from_adapter(
            lm.adapter,
            torch.from_numpy(cap.resid),
            torch.from_numpy(cap.acts),
            torch.from_numpy(cap.targets),
            torch.from_numpy(mean_acts),
        ).to(device, dt)
        n_pos = inputs.n_positions
        with tqdm(
            total=n_pos, desc="mean ablation (all neurons)", unit="pos", disable=not self.progress
        ) as bar:
            if cfg.method == "fast":
                delta_t, stats = delta_loss_fast(inputs, tol=cfg.tol, progress=bar.update)
                log.info("exact fallback for %.3f%% of pairs", 100 * stats.fallback_rate)
            elif cfg.method == "exact":
                delta_t = delta_loss_exact(inputs).float()
                bar.update(n_pos)
            else:
                delta_t = delta_loss_recompute(inputs, range(inputs.n_neurons)).float()
                bar.update(n_pos)
        delta = delta_t.numpy().astype(np.float32)
        self.cache.save("ablation", key, {"delta": delta})
        return delta
