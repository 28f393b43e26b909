"""Arms of a study: a head with its settings, ``name[:field=value[:field=value ...]]``.

``partial_fc:rate=0.1`` is Partial FC with ``config.head.sample_rate = 0.1``; fields are
those of ``config.head`` (``rate`` is short for ``sample_rate``; nested fields with dots:
``partial_fc:margin.m2=0.4``). Values take the type of the field they set.
"""

from __future__ import annotations

import dataclasses
import re

import ml_collections

from pfc_jax import heads
from pfc_jax.errors import InputError

ALIASES = {"rate": "sample_rate"}


@dataclasses.dataclass(frozen=True)
class Arm:
    head: str
    settings: tuple[tuple[str, str], ...] = ()

    @property
    def name(self) -> str:
        """The canonical spelling, e.g. ``partial_fc:sample_rate=0.1``."""
        return ":".join([self.head, *(f"{k}={v}" for k, v in self.settings)])

    @property
    def slug(self) -> str:
        """A folder name for the arm's runs."""
        return re.sub(r"[^A-Za-z0-9_.=-]+", "_", self.name.replace(":", "-"))

    def apply(self, config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
        """A copy of ``config`` training this arm."""
        config = ml_collections.ConfigDict(config.to_dict())
        config.head.name = self.head
        for field, text in self.settings:
            parent, _, leaf = f"head.{field}".rpartition(".")
            node = config
            for part in parent.split("."):
                node = node[part] if part in node else None
                if not isinstance(node, ml_collections.ConfigDict):
                    break
            if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
                fields = ", ".join(k for k in config.head.keys() if k != "name")
                raise InputError(
                    f"arm {self.name!r}: config.head has no field {field!r} (fields: {fields}; rate = sample_rate)"
                )
            node[leaf] = _parse(text, node[leaf], f"arm {self.name!r}: head.{field}")
        return config


def _parse(text: str, current, what: str):
    if isinstance(current, bool):
        if text.lower() in ("true", "1", "yes"):
            return True
        if text.lower() in ("false", "0", "no"):
            return False
        raise InputError(f"{what} = {text!r}: must be true or false")
    for kind in (int, float):
        if isinstance(current, kind):
            try:
                return kind(text)
            except ValueError:
                raise InputError(f"{what} = {text!r}: must be a number ({kind.__name__})") from None
    return text


def parse_arms(spec: str) -> list[Arm]:
    """``"partial_fc:rate=1.0,partial_fc:rate=0.1"`` -> two arms (refusing unknown heads,
    malformed settings and duplicates)."""
    arms = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        head, *settings = part.split(":")
        if head not in heads.HEADS:
            raise InputError(f"--arms: unknown head {head!r} in {part!r} (heads: {', '.join(heads.HEADS)})")
        pairs = []
        for s in settings:
            field, eq, value = s.partition("=")
            if not eq or not field or not value:
                raise InputError(f"--arms: {s!r} in {part!r} is not field=value (e.g. partial_fc:rate=0.1)")
            pairs.append((ALIASES.get(field, field), value))
        arm = Arm(head, tuple(pairs))
        if any(a.name == arm.name for a in arms):
            raise InputError(f"--arms: {arm.name!r} is given twice")
        arms.append(arm)
    if not arms:
        raise InputError("--arms: no arm given (e.g. --arms partial_fc:rate=1.0,partial_fc:rate=0.1)")
    return arms
