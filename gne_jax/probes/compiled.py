"""Compile once per structure: a user function split into its structure and its arrays.

The library's entry points take user callables (``fn``, ``matvec``, ``loss_fn``) that
close over arrays: model weights, a data batch, the residuals of a linearization.
Jitting with the callable as a static argument would compile a new program for every
new closure (a new ``lambda x: model.apply(params, x)``, a new
``functools.partial(apply, variables)`` at the next checkpoint), embed its arrays in
the program as constants and keep every closure alive in the jit cache.

Instead, ``hoist(fn, *example_args)`` traces ``fn`` to a jaxpr (tracing only, no
compilation) and splits it into

* its ``Structure``: the jaxpr with every closed-over array turned into an input
  (``constvars``), the input/output tree structures and abstract values. Two
  structures are equal when their jaxprs print the same, whatever Python function
  object produced them;
* its constants: the closed-over arrays themselves (passed as data).

``call(impl, static, fns, args)`` then runs ``impl(*bound_fns, *args, **static)`` in a
jitted program cached on ``(impl, static, structures)``: a new closure over new
weights of the same architecture reuses the compiled program, and the cache holds
only jaxprs (no user function, no weight). At most ``MAX_PROGRAMS`` programs are kept
(least recently used dropped first).

Under an outer ``jit``/``vmap``/``grad`` there is nothing to compile: the entry points
call their implementation directly (see ``is_concrete``).
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable, Sequence
from typing import Any

import jax

from gne_jax._tree import is_concrete

PyTree = Any
MAX_PROGRAMS = 256


class Structure:
    """A traced function without its constants: hashable by its jaxpr's text and avals."""

    __slots__ = ("key", "jaxpr", "in_tree", "out_tree", "out_shape")

    def __init__(self, jaxpr, in_tree, out_tree, in_avals, out_shape):
        const_avals = tuple(v.aval for v in jaxpr.constvars)
        self.key = (str(jaxpr), in_tree, out_tree, tuple(in_avals), const_avals)
        self.jaxpr = jaxpr
        self.in_tree = in_tree
        self.out_tree = out_tree
        self.out_shape = out_shape

    def __hash__(self) -> int:
        return hash(self.key)

    def __eq__(self, other) -> bool:
        return isinstance(other, Structure) and self.key == other.key

    def bind(self, consts: Sequence[jax.Array]) -> Callable:
        """The function again, with ``consts`` (arrays or tracers) as its closed-over arrays."""
        jaxpr, in_tree, out_tree = self.jaxpr, self.in_tree, self.out_tree

        def fn(*args):
            flat, tree = jax.tree.flatten(args)
            if tree != in_tree:
                raise TypeError(f"expected arguments with tree structure {in_tree}; got {tree}")
            out = jax.core.eval_jaxpr(jaxpr, list(consts), *flat)
            return jax.tree.unflatten(out_tree, out)

        return fn


def hoist(fn: Callable, *example_args, argname: str | None = "fn",
          inputs: str = "x") -> tuple[Structure, list]:
    """``(structure, consts)`` of ``fn`` traced at ``example_args`` (arrays or ShapeDtypeStructs).

    ``structure.bind(consts)`` computes what ``fn`` computes. Raises a ``ValueError``
    naming ``argname`` when ``fn`` rejects the arguments (``argname=None``: the
    function's own error, unchanged).
    """
    try:
        closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(*example_args)
    except Exception as e:
        if argname is None:
            raise  # the user's function raised: say which argument and why
        shapes = jax.tree.map(lambda a: (tuple(a.shape), str(a.dtype)), example_args)
        raise ValueError(
            f"`{argname}` rejected the input `{inputs}` with (shape, dtype) {shapes}: "
            f"{type(e).__name__}: {e}"
        ) from e
    structure = Structure(closed.jaxpr, jax.tree.structure(example_args),
                          jax.tree.structure(out_shape), closed.in_avals, out_shape)
    return structure, list(closed.consts)


_PROGRAMS: collections.OrderedDict = collections.OrderedDict()
_LOCK = threading.Lock()


def _options_key(compiler_options):
    return None if compiler_options is None else tuple(sorted(compiler_options.items()))


def program(impl: Callable, static: tuple, structures: tuple[Structure, ...],
            compiler_options: dict | None = None):
    """The jitted ``(consts_list, *args) -> impl(*fns, *args, **dict(static))``, cached."""
    key = (impl, static, structures, _options_key(compiler_options))
    with _LOCK:
        prog = _PROGRAMS.get(key)
        if prog is not None:
            _PROGRAMS.move_to_end(key)
            return prog
    kw = dict(static)

    def run(consts_list, *args):
        fns = [s.bind(c) for s, c in zip(structures, consts_list, strict=True)]
        return impl(*fns, *args, **kw)

    prog = jax.jit(run, compiler_options=compiler_options)
    with _LOCK:
        prog = _PROGRAMS.setdefault(key, prog)
        _PROGRAMS.move_to_end(key)
        while len(_PROGRAMS) > MAX_PROGRAMS:
            _PROGRAMS.popitem(last=False)
    return prog


def call(impl: Callable, static: dict, fns: Sequence[tuple[Callable, tuple, str]], args: tuple,
         *, compiler_options: dict | None = None):
    """``impl(*fns, *args, **static)`` compiled once per structure of ``fns`` and ``static``.

    Args:
      impl: a module-level function (part of the cache key) taking the functions first.
      static: hashable options (Python ints, strings, None) that shape the program.
      fns: ``(fn, example_args, argname)`` for each user function; ``fn`` is traced at
        ``example_args`` (arrays or ``jax.ShapeDtypeStruct``) and its closed-over arrays
        become arguments of the program.
      args: the program's array arguments (inputs, keys).

    When a function closes over traced values or ``args`` are traced (an outer
    ``jit``/``vmap``), ``impl`` is called directly on the original functions instead.
    """
    hoisted = [hoist(f, *ex, argname=name) for f, ex, name in fns]
    if not is_concrete([c for _, c in hoisted], args):
        # a function closes over traced values (under an outer transformation): inline
        return impl(*[f for f, _, _ in fns], *args, **static)
    structures = tuple(s for s, _ in hoisted)
    prog = program(impl, tuple(sorted(static.items())), structures, compiler_options)
    return prog([c for _, c in hoisted], *args)


class AbstractTree:
    """Shapes and dtypes of a pytree, hashable: a static argument standing for ``like``."""

    __slots__ = ("treedef", "leaves")

    def __init__(self, tree: PyTree):
        leaves, self.treedef = jax.tree.flatten(tree)
        self.leaves = tuple(jax.ShapeDtypeStruct(jax.numpy.shape(a), jax.numpy.result_type(a))
                            for a in leaves)

    def tree(self) -> PyTree:
        """The pytree of ``jax.ShapeDtypeStruct``\\ s."""
        return jax.tree.unflatten(self.treedef, self.leaves)

    def __hash__(self) -> int:
        return hash((self.treedef, self.leaves))

    def __eq__(self, other) -> bool:
        return (isinstance(other, AbstractTree) and self.treedef == other.treedef
                and self.leaves == other.leaves)


def clear_programs() -> None:
    """Drops every cached program (and with it their compiled executables)."""
    with _LOCK:
        _PROGRAMS.clear()


def num_programs() -> int:
    """How many programs the cache holds."""
    return len(_PROGRAMS)
