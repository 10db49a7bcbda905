"""The patch machinery behind every ``fastjepa.integrations.<codebase>.apply()``.

The contract every piece plugs into:

* A **patch** is a tuple ``(owner, attr_name, new_object)``: ``owner`` is a module or a
  class, ``attr_name`` one of its attributes, ``new_object`` what to put there. A class
  is patched in place (``setattr(cls, "forward", new)``), so instances built before and
  after the call both take the patch.
* A **provider** is a function of the codebase's imported modules (``{name: module}``)
  that returns a list of patches; an integration calls one provider per flag, so a user
  who sees a numeric difference can switch pieces off one at a time.
* :meth:`PatchSet.apply` records the original ``owner.__dict__[attr_name]`` (not
  ``getattr``: a ``staticmethod``, ``classmethod`` or other descriptor comes back as
  the very same object; an attribute the owner only inherited is deleted again on
  revert) and sets the new one. :meth:`PatchSet.revert` restores every original, newest
  first, so ``owner.__dict__[attr_name] is original`` afterwards.
* A module-level function is also held, under its own or another name, by every module
  that did ``from … import`` it: :func:`function_patches` finds each of those copies by
  identity (``value is original``) in every imported module and patches them all. A module
  listed in ``sys.modules`` under two names (``multiprocessing`` registers the script run
  as ``__main__`` also as ``__mp_main__``) is one owner, patched once.
* The same site offered twice in one :meth:`PatchSet.apply` (by two providers, or by one
  provider through two routes) is patched once when both offers replace the same original
  (the same new object, or replacements of the same ``__fastjepa_original__``); two
  different replacements of one site are refused.
* A module imported *after* ``apply()`` that did ``from … import`` a patched function
  holds the replacement: :meth:`PatchSet.revert` finds such copies by identity too and
  puts the original there, so every site is restored whichever order the imports and the
  ``apply()`` came in.
* Applying a :class:`PatchSet` that is already applied reverts it first, so ``apply()``
  twice ends in the state of one call (and picks up modules imported in between).

A replacement keeps the original's name, docstring and signature (``functools.wraps``)
and carries the original as ``__fastjepa_original__``; it falls back to the original for
any call it does not handle, so behaviour outside the fast path is unchanged.
"""

from __future__ import annotations

import functools
import inspect
import sys
import types
from collections.abc import Callable, Iterable, Mapping

Patch = tuple[object, str, object]  # (owner, attr_name, new_object)
Provider = Callable[[Mapping[str, types.ModuleType]], list[Patch]]

_MISSING = object()


class CodebaseMismatch(RuntimeError):
    """The imported modules are not the codebase an integration was asked to patch."""


def describe(owner: object, attr: str) -> str:
    """Readable name of ``owner.attr``: ``src.masks.utils.apply_masks``,
    ``src.models.vision_transformer.VisionTransformer.forward``."""
    if isinstance(owner, types.ModuleType):
        return f"{owner.__name__}.{attr}"
    return f"{owner.__module__}.{owner.__qualname__}.{attr}"


def replaces(original: Callable) -> Callable[[Callable], Callable]:
    """Decorator for a replacement: ``functools.wraps(original)`` plus ``__fastjepa_original__``."""

    def deco(new: Callable) -> Callable:
        new = functools.wraps(original)(new)
        new.__fastjepa_original__ = original
        return new

    return deco


def function_patches(original: Callable, new: Callable, *, skip: Iterable[str] = ("fastjepa",)) -> list[Patch]:
    """One patch per imported module attribute that *is* ``original`` (identity), its
    defining module first, so that ``from … import`` copies are patched too."""
    return [(module, attr, new) for module, attr in holders(original, skip=skip)]


def holders(obj: object, *, skip: Iterable[str] = ("fastjepa",), first: str | None = None) -> list[tuple[types.ModuleType, str]]:
    """``(module, attr_name)`` for every imported module attribute that *is* ``obj``
    (identity), each module once however many names ``sys.modules`` lists it under;
    the module named ``first`` (default: ``obj.__module__``) first, then by name."""
    skip = tuple(skip)
    first = getattr(obj, "__module__", None) if first is None else first
    seen: set[int] = set()
    found: list[tuple[types.ModuleType, str]] = []
    for name, module in sorted(list(sys.modules.items()), key=lambda kv: (kv[0] != first, kv[0])):
        if module is None or id(module) in seen or any(name == s or name.startswith(s + ".") for s in skip):
            continue
        seen.add(id(module))
        try:
            items = list(vars(module).items())
        except TypeError:  # a module-like object without a __dict__
            continue
        found.extend((module, attr) for attr, value in items if value is obj)
    return found


def class_patch(cls: type, attr: str, make: Callable[[Callable], Callable]) -> Patch:
    """Patch ``cls.attr`` (defined on ``cls`` itself) with ``make(original)``."""
    if attr not in vars(cls):
        raise AttributeError(f"{cls.__module__}.{cls.__qualname__} defines no {attr!r} of its own")
    return (cls, attr, make(vars(cls)[attr]))


def parameters(fn: Callable) -> list[str]:
    """The parameter names of ``fn`` (of the original, through ``__wrapped__``)."""
    try:
        return list(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return []


class PatchSet:
    """What one integration has patched; :meth:`apply` and :meth:`revert` as above."""

    def __init__(self, name: str):
        self.name = name
        self._records: list[tuple[object, str, object, object]] = []  # (owner, attr, original, new)

    @property
    def active(self) -> bool:
        return bool(self._records)

    def patched(self) -> list[str]:
        return [describe(owner, attr) for owner, attr, _, _ in self._records]

    def apply(self, patches: Iterable[Patch]) -> list[str]:
        if self.active:
            self.revert()
        seen: dict[tuple[int, str], object] = {}
        try:
            for owner, attr, new in patches:
                key = (id(owner), attr)
                if key in seen:
                    if _same_replacement(seen[key], new):
                        continue  # one site reached through two providers: patched once
                    raise ValueError(
                        f"{self.name}: {describe(owner, attr)} is given two different replacements in one apply()"
                    )
                seen[key] = new
                original = vars(owner).get(attr, _MISSING)
                setattr(owner, attr, new)
                self._records.append((owner, attr, original, new))
        except BaseException:
            self.revert()
            raise
        return self.patched()

    def apply_providers(self, mods: Mapping[str, types.ModuleType], chosen: Iterable[tuple[bool, Provider]]) -> list[str]:
        """Revert, then apply the patches of every provider whose flag is set (one
        ``apply()`` of an integration: ``chosen`` is its ``(flag, provider)`` list)."""
        self.revert()
        return self.apply([p for flag, provider in chosen if flag for p in provider(mods)])

    def revert(self) -> list[str]:
        restored = self.patched()
        functions: dict[int, tuple[object, object]] = {}  # id(new) -> (new, original) of module-level patches
        while self._records:
            owner, attr, original, new = self._records.pop()
            # only replacement functions are looked for elsewhere: a value such as a small int
            # or None is shared by every module that holds an equal one, never a copy of ours
            if isinstance(owner, types.ModuleType) and original is not _MISSING and _is_replacement_function(new):
                functions[id(new)] = (new, original)
            if original is _MISSING:
                if attr in vars(owner):
                    delattr(owner, attr)
            else:
                setattr(owner, attr, original)
        # copies of a replacement taken by modules imported after apply() (`from … import`)
        for new, original in functions.values():
            for module, attr in holders(new, first=""):
                setattr(module, attr, original)
        return restored


def _is_replacement_function(obj: object) -> bool:
    """A function object (a replacement fastjepa made), whose identity no unrelated module shares."""
    return isinstance(obj, types.FunctionType) or getattr(obj, "__fastjepa_original__", None) is not None


def _same_replacement(a: object, b: object) -> bool:
    """Whether ``a`` and ``b`` replace the same thing: the same object, or two replacements
    (:func:`replaces`) of the same original."""
    if a is b:
        return True
    oa, ob = getattr(a, "__fastjepa_original__", None), getattr(b, "__fastjepa_original__", None)
    return oa is not None and oa is ob


def imported(names: Iterable[str]) -> dict[str, types.ModuleType]:
    """The modules among ``names`` that are already imported."""
    return {n: sys.modules[n] for n in names if sys.modules.get(n) is not None}


def describe_package(package: str) -> str:
    """What is imported as ``package``: its location and submodules, for error messages."""
    root = sys.modules.get(package)
    if root is None:
        return f"no module named {package!r} imported"
    where = getattr(root, "__file__", None) or list(getattr(root, "__path__", []) or [])
    subs = sorted(n for n in sys.modules if n.startswith(package + "."))
    shown = ", ".join(subs[:12]) + (f", … ({len(subs)} in all)" if len(subs) > 12 else "")
    return f"{package!r} from {where} with submodules [{shown}]"


def package_modules(packages: Iterable[str]) -> dict[str, types.ModuleType]:
    """Every imported module of ``packages`` (the packages themselves and their submodules)."""
    packages = tuple(packages)
    return {
        n: m for n, m in sorted(sys.modules.items())
        if m is not None and any(n == p or n.startswith(p + ".") for p in packages)
    }  # fmt: skip
