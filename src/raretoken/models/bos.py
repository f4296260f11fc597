"""The BOS policy of a run: whether every context window starts with the tokenizer's BOS token.

A run asks for ``bos = "auto"`` (the default), ``"none"`` or ``"prepend"``;
:func:`resolve_bos` turns that into the policy the windows are drawn with (``"none"`` or
``"prepend"``, see :mod:`raretoken.data.sampling`) and says why. ``auto`` follows what the
model needs:

1. ``prepend`` for a family that requires a BOS token
   (:attr:`~raretoken.models.adapters.ModelAdapter.bos_required`: Gemma 2 and Gemma 3);
2. else ``prepend`` when the model's own tokenizer puts its BOS token before every text it
   encodes (:func:`~raretoken.models.tokenizer.tokenizer_adds_bos`): the model was trained
   and is used that way (e.g. Llama 2/3, Mistral). One model type covers models that differ
   here (``llama``: Llama 3 adds ``<|begin_of_text|>``, SmolLM2 adds nothing, and its
   ``<|im_start|>`` BOS is a chat marker), so below the family level the tokenizer decides;
3. else ``none`` (GPT-2, Pythia, SmolLM2, Qwen 2/3: their tokenizers add no BOS token).

An explicit ``none`` on a family that requires a BOS token is kept but warned
(:attr:`BosChoice.warning`, logged and written into ``summary.md``); ``prepend`` (asked for
or chosen by ``auto``) with a tokenizer that has no BOS token is a one-line
:class:`~raretoken.errors.ConfigError`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from ..errors import ConfigError
from .adapters import check_model_type
from .tokenizer import TokenizerInfo

__all__ = ["BOS_CHOICES", "BosChoice", "family_bos_requirement", "resolve_bos"]

#: The values of a run's ``bos`` setting.
BOS_CHOICES: tuple[str, ...] = ("auto", "none", "prepend")


@dataclass(frozen=True)
class BosChoice:
    """The BOS policy a run's windows are drawn with, and why.

    Attributes
    ----------
    requested:
        The run's setting: ``"auto"``, ``"none"`` or ``"prepend"``.
    policy:
        What the windows use: ``"none"`` or ``"prepend"``.
    reason:
        Why, in a few words (``"gemma2 requires it"``, ``"set explicitly"``, ...).
    token:
        The BOS token prepended (``None`` when none is).
    warning:
        A warning for the log and the summary (a family that requires a BOS token run
        without one), else ``None``.
    """

    requested: str
    policy: str
    reason: str
    token: str | None = None
    warning: str | None = None

    def describe(self) -> str:
        """One line for ``summary.md``, e.g. ``"`<bos>` prepended to every window (auto:
        gemma2 requires it)"``."""
        what = (
            f"`{self.token}` prepended to every window"
            if self.policy == "prepend" and self.token is not None
            else "prepended to every window"
            if self.policy == "prepend"
            else "none (windows start with a corpus token)"
        )
        how = f"auto: {self.reason}" if self.requested == "auto" else self.reason
        return f"{what} ({how})"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BosChoice:
        token, warning = data.get("token"), data.get("warning")
        return cls(
            requested=str(data["requested"]),
            policy=str(data["policy"]),
            reason=str(data["reason"]),
            token=None if token is None else str(token),
            warning=None if warning is None else str(warning),
        )


def family_bos_requirement(model_type: str | None) -> str | None:
    """Why the family of ``model_type`` requires a BOS token, or ``None`` (also for ``None``).

    Raises
    ------
    UnsupportedArchitectureError
        A model type without adapter.
    """
    if model_type is None:
        return None
    return check_model_type(model_type).bos_required


def resolve_bos(requested: str, info: TokenizerInfo, *, source: str = "the model") -> BosChoice:
    """The BOS policy for a run asking for ``requested`` on the model ``info`` describes.

    See the module docstring for the rule. ``source`` names the model in messages.

    Raises
    ------
    ConfigError
        An unknown ``requested``, or ``prepend`` (asked for or chosen) with a tokenizer that
        has no BOS token.
    """
    if requested not in BOS_CHOICES:
        raise ConfigError(f"bos must be one of {', '.join(BOS_CHOICES)}, got {requested!r}")
    family = info.model_type or "this model type"
    required = family_bos_requirement(info.model_type)
    token = info.bos_token or "its BOS token"
    if requested == "auto":
        if required is not None:
            policy, reason = "prepend", f"{family} requires it"
        elif info.adds_bos:
            policy, reason = "prepend", f"the tokenizer adds {token} to every text it encodes"
        else:
            policy = "none"
            reason = f"{family} does not require one and its tokenizer adds none"
    else:
        policy = requested
        reason = f"set explicitly: bos = {requested!r}"
        if requested == "none" and info.adds_bos and required is None:
            reason += f", although the tokenizer adds {token} to every text it encodes"
    if policy == "prepend" and info.bos_token_id is None:
        why = f"{family} requires one" if requested == "auto" else "bos = 'prepend' asks for one"
        raise ConfigError(
            f"the tokenizer of {source!r} has no BOS token but {why}; use a tokenizer with a "
            "BOS token or bos = 'none'"
        )
    warning = None
    if policy == "none" and required is not None:
        warning = (
            f"{family} requires a BOS token ({required}) but bos = 'none' was set: the windows "
            "start without one, so the losses and Δloss do not describe the model as it is used"
        )
    return BosChoice(
        requested=requested,
        policy=policy,
        reason=reason,
        token=info.bos_token if policy == "prepend" else None,
        warning=warning,
    )
