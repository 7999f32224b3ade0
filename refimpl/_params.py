r"""Reading and checking the ``params`` of a NumPy forward: one home, one error style.

A NumPy forward takes ``params``, a flat mapping whose keys are exactly those of the
PyTorch module's ``state_dict()``. The oracle is strict (DESIGN.md): ``params`` must hold
exactly the keys and shapes that the forward's options (and the widths read from the
weights) imply. A user cross-checking a checkpoint must never get a silently different
function, so:

* a missing key, an unexpected one (misspelled, or ``module.``-prefixed as a
  ``DataParallel`` checkpoint saves it) is a :class:`ParamsKeyError` (a ``KeyError``);
* a key of the wrong shape is a ``ValueError``;

and both name the FULL key the user passed (``mask.down1.unit1.conv1.weight``, not
``conv1.weight`` of a nested call), the expected shape and the one that came.

Every forward does the same three steps:

1. ``p = Params.of(params, who)``: a read-only view. A forward that calls another one
   passes ``p.sub("mask")``, a view of the same mapping under a prefix, so the nested
   forward's messages still name full keys.
2. Build a :class:`Spec`: the expected ``{key: shape}`` from the options and from widths
   read with :meth:`Params.dim`. Optional groups of keys (biases, a batch norm) that a
   forward selects by their presence, where its docstring says so, are chosen with
   :meth:`Params.has_any` and then added whole, so an incomplete group is reported as
   missing keys.
3. ``p.check(spec)``; then read arrays with ``p["conv.weight"]``.

Batch norms' ``num_batches_tracked`` (in every ``state_dict()``) is accepted and
optional. Nothing here imports torch.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import numpy as np

#: DataParallel / DistributedDataParallel checkpoints prefix every key with this.
WRAPPER_PREFIX = "module."
#: How many keys of each kind an error message lists before "and N more".
_LISTED = 8

Shape = tuple[int, ...]
#: A width that no present key tells (every key it could be read from is missing); the
#: check then reports those keys as missing, with "?" in their expected shapes.
UNKNOWN = -1


class ParamsKeyError(KeyError):
    """A missing or unexpected key in ``params``; ``str()`` is the readable message."""

    def __str__(self) -> str:  # KeyError's str() would show the repr of the message
        return str(self.args[0]) if self.args else ""


class Spec:
    """The keys a forward expects, with their shapes: required and optional ones.

    Keys are relative to the :class:`Params` view the spec is checked against.
    """

    def __init__(self) -> None:
        self.required: dict[str, Shape] = {}
        self.optional: dict[str, Shape] = {}
        self.notes: dict[str, str] = {}
        self.possible: set[str] = set()  # keys of unselected optional groups, for hints

    def add(self, key: str, shape: Iterable[int]) -> Spec:
        """A required key of the given shape."""
        self.required[key] = tuple(int(s) for s in shape)
        return self

    def add_optional(self, key: str, shape: Iterable[int]) -> Spec:
        """A key that may be absent; if present it must have this shape."""
        self.optional[key] = tuple(int(s) for s in shape)
        return self

    def maybe(self, *keys: str) -> Spec:
        """Keys of an optional group that is not selected: not expected, but a misspelling
        of one is hinted at (``conv.bais``: did you mean ``conv.bias``?)."""
        self.possible.update(keys)
        return self

    def note(self, key: str, text: str) -> Spec:
        """Why ``key`` is expected, added to the message when it is missing."""
        self.notes[key] = text
        return self

    def linear(self, name: str, out_features: int, in_features: int, bias: bool) -> Spec:
        """``nn.Linear``: ``name.weight`` (out, in) and, with ``bias``, ``name.bias`` (out,)."""
        self.add(f"{name}.weight", (out_features, in_features))
        if bias:
            self.add(f"{name}.bias", (out_features,))
        return self

    def conv(self, name: str, out_channels: int, in_channels: int, kernel: int, bias: bool) -> Spec:
        """``nn.Conv2d`` (groups 1, square kernel): ``name.weight`` and maybe ``name.bias``."""
        self.add(f"{name}.weight", (out_channels, in_channels, kernel, kernel))
        if bias:
            self.add(f"{name}.bias", (out_channels,))
        return self

    def batch_norm(self, name: str, channels: int) -> Spec:
        """``nn.BatchNorm1d/2d`` with affine and running statistics, as in ``state_dict()``."""
        for key in ("weight", "bias", "running_mean", "running_var"):
            self.add(f"{name}.{key}", (channels,))
        self.add_optional(f"{name}.num_batches_tracked", ())
        return self

    def include(self, prefix: str, other: Spec) -> Spec:
        """Every key of ``other`` under ``prefix`` (``"mask."``, ``"channel."``)."""
        self.required.update({prefix + k: v for k, v in other.required.items()})
        self.optional.update({prefix + k: v for k, v in other.optional.items()})
        self.notes.update({prefix + k: v for k, v in other.notes.items()})
        self.possible.update(prefix + k for k in other.possible)
        return self


class Params(Mapping[str, np.ndarray]):
    """A read-only view of a flat ``params`` mapping under a key prefix.

    Indexing returns ``np.asarray`` of the value; a missing key raises a
    :class:`ParamsKeyError` naming the full key. Keys given to and returned by the view
    are relative to its prefix; messages always show full keys.
    """

    def __init__(
        self,
        params: Mapping[str, Any],
        who: str,
        prefix: str = "",
        _widths: dict[str, Shape] | None = None,
    ) -> None:
        if not isinstance(params, Mapping):
            raise TypeError(
                f"{who} expects params as a mapping of key -> array (a state_dict()), "
                f"got {type(params).__name__}"
            )
        self._root = params
        self.who = who
        self.prefix = prefix
        # full key -> shape of every key a width was read from, shared by all views of
        # one mapping: a shape error says where its expected shape came from
        self._widths: dict[str, Shape] = {} if _widths is None else _widths

    @classmethod
    def of(cls, params: Mapping[str, Any] | Params, who: str) -> Params:
        """``params`` as a view; a view passed in (from an enclosing forward) is kept, so
        that its prefix and its caller's name stay in the messages."""
        return params if isinstance(params, Params) else cls(params, who)

    # -- the Mapping protocol, relative keys -------------------------------------------

    def full(self, key: str) -> str:
        """The key as the user passed it."""
        return self.prefix + key

    def __getitem__(self, key: str) -> np.ndarray:
        full = self.full(key)
        if full not in self._root:
            raise self._key_error([key], {})
        return np.asarray(self._root[full])

    def get(self, key: str, default: Any = None) -> Any:
        """``params[key]`` as an array, or ``default`` if the key is absent (no error built)."""
        full = self.full(key)
        return np.asarray(self._root[full]) if full in self._root else default

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and self.full(key) in self._root

    def __iter__(self) -> Iterator[str]:
        n = len(self.prefix)
        return (k[n:] for k in self._root if isinstance(k, str) and k.startswith(self.prefix))

    def __len__(self) -> int:
        return sum(1 for _ in self)

    # -- reading structure --------------------------------------------------------------

    def sub(self, name: str) -> Params:
        """The view under ``name.`` (``p.sub("mask")`` reads ``mask.head.conv1.weight`` as
        ``head.conv1.weight``)."""
        return Params(self._root, self.who, f"{self.prefix}{name}.", self._widths)

    def has_any(self, keys: Iterable[str]) -> bool:
        """Whether any of ``keys`` is present: selects an optional group by its keys."""
        return any(k in self for k in keys)

    def indices(self, name: str) -> list[int]:
        """The integers i for which some key starts with ``{name}{i}.``, sorted
        (``p.indices("down")`` -> [1, 2] for ``down1.*`` and ``down2.*``)."""
        found = set()
        for key in self:
            if key.startswith(name):
                head = key[len(name) :].split(".", 1)[0]
                if head.isdigit() and "." in key[len(name) :]:
                    found.add(int(head))
        return sorted(found)

    def dim(self, *sources: tuple[str, int, int], default: int | None = None) -> int:
        """A width read from the weights: ``(key, ndim, axis)`` of each present source.

        Several sources let the width be read even when one key is missing (the check
        that follows then reports every missing key with its expected shape) and outvote
        one misshaped key (which the check then names): the width is the value most
        sources give, the first source's on a tie. A present key of the wrong number of
        dimensions is a ValueError.

        Returns:
            The width; ``default`` if no source is present, else :data:`UNKNOWN` (the
            check then reports the missing keys; no error is raised here, so that the
            message can list every missing and unexpected key at once).
        """
        votes: dict[int, list[str]] = {}
        for key, ndim, axis in sources:
            if key in self:
                shape = self.shape(key)
                if len(shape) != ndim:
                    raise ValueError(
                        f"{self.who}: params['{self.full(key)}'] has shape {shape}, expected "
                        f"{ndim} dimensions"
                    )
                votes.setdefault(int(shape[axis]), []).append(key)
        if not votes:
            return UNKNOWN if default is None else default
        value, keys = max(votes.items(), key=lambda item: len(item[1]))  # first on a tie
        self._widths.setdefault(self.full(keys[0]), self.shape(keys[0]))
        return value

    def shape(self, key: str) -> Shape:
        """The shape of ``params[key]`` (a ParamsKeyError if it is missing)."""
        full = self.full(key)
        if full not in self._root:
            raise self._key_error([key], {})
        return tuple(np.shape(self._root[full]))

    # -- checking -----------------------------------------------------------------------

    def check(self, spec: Spec) -> None:
        """Check that the keys under this view are exactly ``spec``'s, with its shapes.

        Raises:
            ParamsKeyError: a required key is missing or a key is not expected; the
                message lists them all (full keys, expected shapes, hints).
            ValueError: a key has the wrong shape (full key, both shapes).
        """
        missing = [k for k in spec.required if k not in self]
        unexpected = [k for k in self if k not in spec.required and k not in spec.optional]
        if missing or unexpected:
            raise self._key_error(missing, spec.required, unexpected, spec)
        wrong = []
        for key, want in (*spec.required.items(), *spec.optional.items()):
            if key in self:
                got = tuple(np.shape(self._root[self.full(key)]))
                if got != want:
                    wrong.append(f"  params['{self.full(key)}'] has shape {got}, expected {want}")
        if wrong:
            more = [f"  ... and {len(wrong) - _LISTED} more"] if len(wrong) > _LISTED else []
            read = ", ".join(f"'{k}' {shape}" for k, shape in list(self._widths.items())[:6])
            why = f"  (the expected shapes follow from the widths read from {read})"
            head = f"{self.who}: params have keys of the wrong shape:"
            raise ValueError("\n".join([head, *wrong[:_LISTED], *more, why]))

    def _key_error(
        self,
        missing: list[str],
        shapes: Mapping[str, Shape],
        unexpected: list[str] | None = None,
        spec: Spec | None = None,
    ) -> ParamsKeyError:
        """One message for missing and unexpected keys, with a hint for each unexpected
        key: the ``module.`` prefix to strip, or the expected key it most resembles."""
        if unexpected is None:  # a key read directly: look for its likely misspellings
            near = set(difflib.get_close_matches(missing[0], list(self), n=3, cutoff=0.8))
            unexpected = sorted(near | {k for k in self if k.startswith(WRAPPER_PREFIX)})
        expected = [*spec.required, *spec.optional, *spec.possible] if spec else missing
        lines = []
        for key in missing[:_LISTED]:
            want = f" (expected shape {_show(shapes[key])})" if key in shapes else ""
            if spec is not None and key in spec.notes:
                want += f": {spec.notes[key]}"
            lines.append(f"  missing '{self.full(key)}'{want}")
        if len(missing) > _LISTED:
            lines.append(f"  ... and {len(missing) - _LISTED} more missing")
        for key in unexpected[:_LISTED]:
            got = tuple(np.shape(self._root[self.full(key)]))
            hint = _hint(key, expected)
            hint = f": did you mean '{self.full(hint)}'?" if hint else ""
            if key.startswith(WRAPPER_PREFIX) and key[len(WRAPPER_PREFIX) :] in expected:
                hint = f": strip the '{WRAPPER_PREFIX}' prefix"
            lines.append(f"  unexpected '{self.full(key)}' (shape {got}){hint}")
        if len(unexpected) > _LISTED:
            lines.append(f"  ... and {len(unexpected) - _LISTED} more unexpected")
        stripped = [k for k in unexpected if k.startswith(WRAPPER_PREFIX)]
        if stripped and len(stripped) == len(unexpected):
            lines.append(
                f"  (keys saved from a DataParallel/DistributedDataParallel module: strip the "
                f"'{WRAPPER_PREFIX}' prefix)"
            )
        where = f" under '{self.prefix}'" if self.prefix else ""
        head = (
            f"{self.who}: params{where} do not have the keys its options imply "
            "(exactly the module's state_dict() keys):"
        )
        return ParamsKeyError("\n".join([head, *lines]))


def _hint(key: str, expected: list[str]) -> str:
    """The expected key that ``key`` most resembles (a misspelling), or ""."""
    close = difflib.get_close_matches(key, expected, n=1, cutoff=0.8)
    return close[0] if close else ""


def _show(shape: Shape) -> str:
    """A shape for a message, "?" for an :data:`UNKNOWN` width."""
    parts = ["?" if n == UNKNOWN else str(n) for n in shape]
    return f"({parts[0]},)" if len(parts) == 1 else f"({', '.join(parts)})"
