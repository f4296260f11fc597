"""The cached stages of an identification run.

Each stage computes one expensive intermediate, keyed by everything that changes it (see
:mod:`raretoken.storage.cache`); the model and tokenizer are loaded only when a stage misses
the cache, so a rerun of a finished run touches neither.

Token statistics and context windows depend on the tokenizer and the corpus, not on the
weights: their keys hold the tokenizer's content (:func:`~raretoken.models.loading.
tokenizer_identity`) instead of the model's identity, and they are computed with the tokenizer
alone (:func:`~raretoken.models.loading.load_tokenizer`). All checkpoints and sizes sharing a
tokenizer therefore count once and score the same positions; everything from the forward
passes on is keyed by the model. The windows' BOS policy is the run's ``bos`` setting resolved
for the model (:attr:`Stages.bos`; ``auto`` follows what the model needs, see
:mod:`raretoken.models.bos`), and their key holds the resolved policy.
"""

from __future__ import annotations

import importlib.metadata
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from ..ablation.capture import Capture, capture_sample
from ..ablation.chunks import ablate_chunk, ablation_chunks
from ..data.corpus import CorpusSpec, Document, corpus_identity, iter_documents, require_nonempty
from ..data.heldout import PASSAGE_CHARS, heldout_description, select_documents, split_passages
from ..data.sampling import (
    ContextSample,
    check_window_settings,
    sample_until_rare,
    sample_windows,
)
from ..data.scoring import score_rare_and_sample
from ..data.token_stats import FrequencySplit, TokenCounts, count_tokens, split_rare_common
from ..errors import TokenizerMismatchError
from ..models.bos import BosChoice, resolve_bos
from ..models.loading import (
    LoadedModel,
    LoadedTokenizer,
    ModelSpec,
    TokenizerInfo,
    check_gguf,
    embedded_model_identity,
    load_model,
    load_tokenizer,
    model_dims,
    resolve_source,
    tokenizer_identity,
)
from ..stats.covariates import NeuronCovariates, neuron_covariates
from ..storage import ArrayCache, cache_key, default_cache_dir, ensure_writable_dir
from .config import RunConfig

log = logging.getLogger(__name__)

#: Version of the covariates stage's output (part of its cache key).
COVARIATES_VERSION = 1
#: Version of the tokenizer-info entry (part of its cache key). 2: the model type and the
#: tokenizer's BOS token (for the ``auto`` BOS policy).
TOKENIZER_INFO_VERSION = 2

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
    #: Positions per chunk of the ablation stage (default :data:`CHUNK_POSITIONS`).
    chunk_positions: int | None = None
    #: Whether ``"token_statistics"`` / ``"sampling"`` were read from the cache.
    cached: dict[str, bool] = field(default_factory=dict)
    _loaded: LoadedModel | None = None
    _tokenizer_only: LoadedTokenizer | None = None

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

    @cached_property
    def tokenizer_info(self) -> TokenizerInfo:
        """The tokenizer's identity and the model's sizes, read without the weights; kept in
        the cache under the model's identity, so a rerun loads no tokenizer to key its stages."""
        key = cache_key(
            "tokenizer",
            {
                "model": self.model_id,
                "transformers": transformers.__version__,
                "tokenizers": importlib.metadata.version("tokenizers"),
                "version": TOKENIZER_INFO_VERSION,
            },
        )
        hit = self.cache.load_json("tokenizer", key)
        if hit is not None:
            return TokenizerInfo.from_dict(hit)
        info = self._load_tokenizer().info
        self.cache.save_json("tokenizer", key, info.to_dict())
        return info

    def _load_tokenizer(self) -> LoadedTokenizer:
        if self._tokenizer_only is None:
            self._tokenizer_only = load_tokenizer(model_spec(self.cfg))
        return self._tokenizer_only

    @cached_property
    def bos(self) -> BosChoice:
        """The BOS policy the windows are drawn with: the run's ``bos`` setting resolved for
        this model (``auto``: what the model needs; :func:`~raretoken.models.bos.resolve_bos`),
        read from the tokenizer info (no weights). Logged once; a family that requires a BOS
        token run without one is warned."""
        choice = resolve_bos(self.cfg.bos, self.tokenizer_info, source=self.cfg.model)
        if choice.warning is not None:
            log.warning("%s", choice.warning)
        else:
            log.info("BOS: %s", choice.describe())
        return choice

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        """The tokenizer: the loaded model's, else loaded alone (no weights read)."""
        if self._loaded is not None:
            return self._loaded.tokenizer
        return self._load_tokenizer().tokenizer

    @property
    def dims(self) -> dict[str, int]:
        """The model's sizes (:func:`~raretoken.models.loading.model_dims`), from its config
        when it could be built there, else from the loaded model."""
        info = self.tokenizer_info
        return dict(info.dims) if info.dims is not None else model_dims(self.loaded.adapter)

    @property
    def loaded(self) -> LoadedModel:
        if self._loaded is None:
            log.info("loading model %s", self.cfg.model)
            lm = load_model(model_spec(self.cfg))
            self._check_tokenizer_key(lm)
            self._loaded = lm
        return self._loaded

    def _check_tokenizer_key(self, lm: LoadedModel) -> None:
        """Refuse a model whose tokenizer is not the one that keyed its counts and windows."""
        info = self.tokenizer_info
        ident = tokenizer_identity(lm.tokenizer, lm.adapter.dims.vocab_size)
        if ident["sha256"] != info.tokenizer["sha256"]:
            raise TokenizerMismatchError(
                f"the tokenizer of {self.cfg.model!r} (sha256 {ident['sha256'][:12]}, "
                f"{ident['vocab_size']} rows) is not the one its token statistics were keyed by "
                f"({info.tokenizer['sha256'][:12]}, {info.vocab_size} rows); its files changed "
                "in place: rerun with --no-cache or another --cache-dir"
            )

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
                "tokenizer": self.tokenizer_info.key,
                "corpus": self.freq_corpus_id,
                "shared_split": self._split_key,
                "max_tokens": self.cfg.max_count_tokens,
            },
        )

    def token_counts(self) -> tuple[TokenCounts, np.ndarray]:
        """Unigram counts and the token strings of the vocabulary."""
        key = self.counts_key()
        hit = self.cache.load("counts", key)
        self.cached["token_statistics"] = hit is not None
        if hit is None:
            tok = self.tokenizer
            vocab = self.tokenizer_info.vocab_size
            counts = count_tokens(
                self._docs("freq"),
                tok,
                vocab_size=vocab,
                progress=self.progress,
                max_tokens=self.cfg.max_count_tokens,
            )
            strings = np.asarray(
                [str(s) for s in tok.convert_ids_to_tokens(list(range(vocab)))],
                dtype=np.str_,
            )
            hit = dict(counts.to_arrays(), token_strings=strings)
            self.cache.save("counts", key, hit)
        strings = hit.pop("token_strings")
        return TokenCounts.from_arrays(hit), strings

    def splits(self, counts: TokenCounts) -> tuple[FrequencySplit, FrequencySplit]:
        """The rare/common split at ``percentile`` and the split whose rare targets are always
        scored (at ``score_percentile`` under ``rare+common`` scoring, else the same split)."""
        cfg = self.cfg
        split = split_rare_common(counts, percentile=cfg.percentile)
        always = (
            split_rare_common(counts, percentile=cfg.score_percentile, check=False)
            if cfg.scoring == "rare+common"
            else split
        )
        return split, always

    def _sample_key(self, kind: str, split: FrequencySplit | None) -> str:
        cfg = self.cfg
        parts: dict[str, Any] = {
            "tokenizer": self.tokenizer_info.key,
            "corpus": self.context_corpus_id,
            "shared_split": self._split_key,
            "window_len": cfg.window_len,
            "bos": self.bos.policy,  # resolved: a run whose "auto" means "none" keeps its key
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

    def samples(
        self, split: FrequencySplit, always: FrequencySplit | None = None
    ) -> tuple[ContextSample, ContextSample, str, str]:
        """The scored context windows and the disjoint reference windows for n̄.

        With ``scoring="rare+common"`` the windows score every target rare at ``always`` (the
        split at ``score_percentile``; default ``split``) and a uniform sample holding
        ``max_common`` targets common at ``split`` (:mod:`raretoken.data.scoring`); the
        returned key identifies the scored positions.
        """
        main, ref, main_key, ref_key = self._windows(split)
        cfg = self.cfg
        if cfg.scoring == "all":
            return main, ref, main_key, ref_key
        always_split = always if always is not None else split
        always_mask = always_split.masks()[0]
        common_mask = split.masks()[1]
        scored = score_rare_and_sample(
            main,
            always_mask=always_mask,
            common_mask=common_mask,
            max_common=cfg.max_common,
            seed=cfg.seed + 2,
        )
        key = cache_key(
            "scored",
            {
                "windows": main_key,
                "always_ids": cache_key("ids", {"ids": always_split.rare_ids.tolist()}),
                "common_ids": cache_key("ids", {"ids": split.common_ids.tolist()}),
                "max_common": cfg.max_common,
                "seed": cfg.seed + 2,
            },
        )
        return scored, ref, key, ref_key

    def _windows(self, split: FrequencySplit) -> tuple[ContextSample, ContextSample, str, str]:
        """The drawn windows (every position scored) and the reference windows."""
        cfg = self.cfg
        main_key = self._sample_key("main", split)
        ref_key = self._sample_key("reference", split) + main_key[:8]
        max_context = self.tokenizer_info.max_positions
        bos = self.bos.policy
        # the windows are shared by every model with this tokenizer: check this model's context
        check_window_settings(window_len=cfg.window_len, bos_policy=bos,
                              max_context=max_context, max_tokens=cfg.max_stream_tokens)  # fmt: skip
        main_hit = self.cache.load("sample", main_key)
        if main_hit is not None:
            main = ContextSample.from_arrays(main_hit)
        else:
            common: dict[str, Any] = {
                "window_len": cfg.window_len,
                "bos_policy": bos,
                "seed": cfg.seed,
                "max_context": max_context,
                "max_tokens": cfg.max_stream_tokens,
                "progress": self.progress,
            }
            if cfg.sampling == "windows":
                main = sample_windows(
                    self._docs("context"), self.tokenizer, n_windows=cfg.n_windows, **common
                )
            else:
                main = sample_until_rare(
                    self._docs("context"), self.tokenizer, split=split, n_rare=cfg.n_rare,
                    **common,
                )  # fmt: skip
            self.cache.save("sample", main_key, main.to_arrays())
        ref_hit = self.cache.load("sample", ref_key)
        self.cached["sampling"] = main_hit is not None and ref_hit is not None
        if ref_hit is not None:
            ref = ContextSample.from_arrays(ref_hit)
        else:
            ref = sample_windows(
                self._docs("context"),
                self.tokenizer,
                n_windows=cfg.reference_windows,
                window_len=cfg.window_len,
                bos_policy=bos,  # type: ignore[arg-type]
                seed=cfg.seed + 1,
                max_context=max_context,
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
        """The captured arrays of ``sample`` (memory-mapped from the cache entry when caching).

        The forward passes write batch by batch into the arrays of the cache entry being built
        (see :func:`capture_sample`), so memory does not grow with the number of windows.
        """
        kind = "reference" if reference else "main"
        key = self._capture_key(sample_key, kind)
        hit = self.cache.load("capture", key, mmap=True)
        if hit is not None:
            return Capture.from_arrays(hit), key
        lm = self.loaded
        n_layers = lm.adapter.dims.n_layers
        desc = "reference windows (n̄)" if reference else "forward passes"
        with (
            self.cache.writing("capture", key) as w,
            tqdm(total=sample.n_windows, desc=desc, unit="win", disable=not self.progress) as bar,
        ):
            cap = capture_sample(
                lm.model,
                lm.adapter,
                sample,
                batch_size=self.cfg.batch_size,
                device=resolved_device(self.cfg),
                block_index=None if reference else max(0, n_layers - 2),
                acts_only=reference,
                progress=bar.update,
                allocate=w.array,
            )
            if cap.block_index is not None:
                w.put("block_index", np.asarray(cap.block_index))
            arrays = w.commit(mmap=True)
        return Capture.from_arrays(arrays), key

    def covariates(
        self, cap: Capture, rows: np.ndarray, counts: TokenCounts, capture_key: str
    ) -> NeuronCovariates:
        """Per-neuron covariates of the final layer (:mod:`raretoken.stats.covariates`).

        Activation moments are taken over ``rows`` (the uniform sample of positions), the
        unigram direction from ``counts`` (unseen tokens left out).
        """
        key = cache_key(
            "covariates",
            {
                "model": self.model_id,
                "dtype": self.cfg.dtype,
                "capture": capture_key,
                "counts": self.counts_key(),
                "rows": cache_key("ids", {"ids": np.asarray(rows).tolist()}),
                "version": COVARIATES_VERSION,
            },
        )
        hit = self.cache.load_json("covariates", key)
        if hit is not None:
            return NeuronCovariates.from_dict(hit)
        adapter = self.loaded.adapter
        norm = adapter.final_norm()
        w_u = adapter.unembedding()[0]
        c = np.asarray(counts.counts, dtype=np.float64)
        log_freq = np.full(int(w_u.shape[0]), -np.inf)
        n = min(c.size, log_freq.size)
        with np.errstate(divide="ignore"):
            log_freq[:n] = np.log(c[:n])
        w_out = adapter.w_out(-1).detach()
        post = adapter.post_mlp_norm(-1)
        if post is not None:
            # a norm after the MLP (Gemma 2/3, OLMo 2): neuron i reaches the residual as
            # gamma_P * w_i times a per-position scale, so its direction is gamma_P * w_i
            w_out = w_out * post.weight.detach().to(w_out.dtype)
        covs = neuron_covariates(
            w_out,
            {k: v.detach() for k, v in adapter.mlp_in_weights(-1).items()},
            norm.weight.detach(),
            w_u,
            np.asarray(cap.acts[np.asarray(rows, dtype=np.int64)]),
            log_freq,
            norm_kind=norm.kind,  # type: ignore[arg-type]
        )
        self.cache.save_json("covariates", key, covs.to_dict())
        return covs

    @property
    def chunk_rows(self) -> int:
        """Positions per chunk of the ablation stage (before rounding to the method's step)."""
        return int(self.chunk_positions or CHUNK_POSITIONS)

    def ablation(
        self, cap: Capture, mean_acts: np.ndarray, capture_key: str, ref_key: str
    ) -> np.ndarray:
        """``(n_positions, d_mlp)`` signed loss change of ablating each neuron to its mean.

        The positions are ablated chunk by chunk (:attr:`chunk_rows`, rounded to a multiple of
        the method's own step over positions so that every value is the one a single call over
        all positions gives, bit for bit) and each chunk is written into the memory-mapped
        array of the cache entry being built; the result is that array, read back
        memory-mapped (in memory without a cache).
        """
        cfg = self.cfg
        key = cache_key(
            "ablation",
            {"capture": capture_key, "reference": ref_key, "method": cfg.method, "tol": cfg.tol},
        )
        hit = self.cache.load("ablation", key, mmap=True)
        if hit is not None:
            return hit["delta"]
        lm = self.loaded
        device = resolved_device(cfg)
        dt = torch.float64 if cfg.dtype == "float64" else torch.float32
        n_pos, n_neu = int(cap.acts.shape[0]), int(cap.acts.shape[1])
        mean_t = torch.from_numpy(np.array(mean_acts))
        n_fallback = 0
        with (
            self.cache.writing("ablation", key) as w,
            tqdm(
                total=n_pos, desc="mean ablation (all neurons)", unit="pos",
                disable=not self.progress,
            ) as bar,
        ):  # fmt: skip
            out = w.array("delta", (n_pos, n_neu), np.float32)
            for sl, inputs in ablation_chunks(lm.adapter, cap, mean_t, self.chunk_rows, cfg.method,
                                              device, dt):  # fmt: skip
                out[sl], nf = ablate_chunk(inputs, cfg.method, cfg.tol, bar.update)
                n_fallback += nf
            if cfg.method == "fast":
                log.info("exact fallback for %.3f%% of pairs",
                         100 * n_fallback / max(1, n_pos * n_neu))  # fmt: skip
            return w.commit(mmap=True)["delta"]


#: Positions per chunk of the ablation stage (rounded to the method's step; see
#: :func:`ablation_chunks`).
CHUNK_POSITIONS = 4096
