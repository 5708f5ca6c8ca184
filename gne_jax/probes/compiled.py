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
  structures are equal when their jaxprs print the same and the user functions inside
  their parameters (custom JVP/VJP rules, host callbacks, which the print does not
  show) are described alike, whatever Python function object produced them;
* its constants: the closed-over arrays themselves (passed as data).

``call(impl, static, fns, args)`` then runs ``impl(*bound_fns, *args, **static)`` in a
jitted program cached on ``(impl, static, structures)``: a new closure over new
weights of the same architecture reuses the compiled program, and the cache holds
only jaxprs (no user function, no weight). At most ``MAX_PROGRAMS`` programs are kept
(least recently used dropped first).

Under an outer ``jit``/``vmap``/``grad`` there is nothing to compile: the entry points
call their implementation directly (see ``is_concrete``).

**Fast path** (``hoist_fast``): tracing ``fn`` and printing its jaxpr costs a few ms per
call, which is the whole overhead of an eager call on a network that runs in tens of
ms. When ``fn`` is built only from plain Python functions, ``functools.partial``,
bound methods and NNX modules (pytrees), its structure can be read without tracing:
the code objects, the closure cells, defaults and partial arguments (pytrees whose
array leaves are collected, the rest compared by value, with the insertion order of
their dicts' keys, which a treedef sorts), and every global the code
loads (by value; a global array is not allowed). A user's class (a Linen module's, a
frozen dataclass's, an NNX module's or another pytree node's) is described with what
its methods load and its class attributes. Two functions with
equal descriptions trace to the same jaxpr, whose constants are the same positions
among the collected arrays. So the first call of a description traces once and
records that map from arrays to constants; the first later call with other arrays
traces once more to check that the trace does not read the arrays' values (one that
does is traced at every call from then on); later calls only collect the arrays, and
run the program of the traced ``Structure`` (shared with every other form of the same
computation). Anything the description cannot vouch for — a NumPy array or an
unknown object in a closure, a global array, a global module of the user's (its
attributes may be reassigned), an ``import`` in the body or ``sys``/``importlib``
(any module's state), a bound Linen module (its scope holds the variables), a
closure over a tracer, a recursive closure, a constant made while tracing, a host
callback of the user's (a private program) — falls back to tracing, through a new function object
so that JAX's trace cache (keyed by function object) never serves a trace made
before a global was reassigned. Library functions (jax, flax, numpy, this
package...) without user state (no closure, or a decorator's closure over library
functions) are compared by identity: like ``jax.jit``, a redefinition of a helper
that a *library* function calls is not noticed. A user's global function is
described by its own code and globals, so redefining it, or any user function it
calls, changes the description.
"""

from __future__ import annotations

import builtins
import collections
import dataclasses
import dis
import functools
import os
import sys
import sysconfig
import threading
import types
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from gne_jax._tree import is_concrete
from gne_jax.probes.jacobian import output_shape

PyTree = Any
MAX_PROGRAMS = 256


class Structure:
    """A traced function without its constants: hashable by its jaxpr's text and avals."""

    __slots__ = ("key", "jaxpr", "in_tree", "out_tree", "out_shape", "private")

    def __init__(self, jaxpr, in_tree, out_tree, in_avals, out_shape):
        const_avals = tuple(v.aval for v in jaxpr.constvars)
        rules, private = _rules_key(jaxpr)
        # ``private``: arrays the print does not show (a jitted closure's own constants, a
        # rule's closed-over array) are part of this program: it is never shared or cached
        self.private = private
        self.key = (str(jaxpr), in_tree, out_tree, tuple(in_avals), const_avals, rules,
                    object() if private else None)
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


def _rule_functions(obj, depth: int = 8) -> tuple[list, bool]:
    """The user's functions reachable from a jaxpr parameter (a custom-derivative rule, a
    host callback), through the library's wrappers around them, and whether an array is
    reachable outside them (a partial's argument: the printed jaxpr abbreviates it)."""
    seen: set[int] = set()
    found: list = []
    arrays = False

    def walk(v, d):
        nonlocal arrays
        if d < 0 or v is None or id(v) in seen or isinstance(
                v, (bool, int, float, str, bytes, type, types.ModuleType)):
            return
        seen.add(id(v))
        if _jax_internal(v):
            return  # a jaxpr (visited as such), a mesh or a sharding (its device array)
        if type(v).__name__ == "Unhashable" and type(v).__module__.startswith("jax"):
            found.append(_Bound(v.val))  # a rule's static argument (nondiff_argnums)
            return
        if isinstance(v, (np.ndarray, jax.Array)):
            arrays = True
        elif isinstance(v, functools.partial):
            if isinstance(v.func, types.FunctionType) and not _is_library(v.func):
                found.append(v)  # the user's rule with its bound arguments
                return
            for e in (v.func, *v.args, *v.keywords.values()):
                walk(e, d - 1)
        elif isinstance(v, types.FunctionType):
            if not _is_library(v):
                found.append(v)
                return
            for cell in v.__closure__ or ():
                try:
                    walk(cell.cell_contents, d - 1)
                except ValueError:  # an empty cell
                    pass
        elif isinstance(v, types.MethodType):
            if not (_is_library(v.__func__) and _is_library(type(v.__self__))):
                found.append(v)  # a user's method, or a library method of a user's object
                return
            walk(v.__func__, d - 1)
        elif callable(v) and not _is_library(type(v)):
            found.append(v)  # a user's callable object
        elif isinstance(v, (tuple, list)):
            for e in v:
                walk(e, d - 1)
        elif isinstance(v, dict):
            for e in v.values():
                walk(e, d - 1)
        elif isinstance(v, weakref.ref):
            walk(v(), d - 1)
        elif _is_library(type(v)):  # a library's wrapper object (WrappedFun, a callback)
            for name in getattr(type(v), "__slots__", ()):
                try:
                    walk(getattr(v, name, None), d - 1)
                except (AttributeError, TypeError):  # a slot it does not fill, __weakref__
                    pass
            walk(getattr(v, "__dict__", None), d - 1)

    walk(obj, depth)
    return found, arrays


class _Bound:
    """A value bound to a rule by JAX (a ``custom_jvp``'s ``nondiff_argnums`` argument)."""

    __slots__ = ("value",)

    def __init__(self, value):
        self.value = value


def _jax_internal(v) -> bool:
    """JAX's own objects among a primitive's parameters that hold no user state: jaxprs
    (``_rules_key`` visits those of the parameters itself), meshes and shardings."""
    return (hasattr(v, "eqns") or (hasattr(v, "jaxpr") and hasattr(v, "consts"))
            or isinstance(v, (jax.sharding.Mesh, jax.sharding.AbstractMesh,
                              jax.sharding.Sharding)))


_CALLBACKS = frozenset({"pure_callback", "io_callback", "debug_callback"})


def _rules_key(jaxpr) -> tuple[tuple, bool]:
    """What the jaxpr's text does not show, and whether it holds private arrays.

    The user's functions inside its parameters (custom JVP/VJP rules, host callbacks) are
    described like closures, so that two functions differing only there never share a
    program. An inner jitted closure's constants, an array a rule or callback holds, an
    object a rule holds that cannot be described (a bound Linen module), or a host
    callback of the user's (called at run time, with the state its objects have then)
    are private to this trace: compiled for it alone and kept nowhere.
    """
    out: list = []
    private = False

    def visit_jaxpr(j):
        nonlocal private
        for eqn in j.eqns:
            if eqn.primitive.name in _CALLBACKS and any(_rule_functions(eqn.params)):
                # the program calls this host function object at run time, whose state
                # may change after the trace: it is never shared with another function
                private = True
            for v in eqn.params.values():
                visit(v)

    def visit(v):
        nonlocal private
        if hasattr(v, "jaxpr") and hasattr(v, "consts"):  # a ClosedJaxpr
            private = private or bool(v.consts)
            visit_jaxpr(v.jaxpr)
        elif hasattr(v, "eqns"):  # a Jaxpr
            visit_jaxpr(v)
        elif isinstance(v, (tuple, list)):
            for e in v:
                visit(e)
        elif not isinstance(v, (bool, int, float, str, type(None), np.ndarray, np.dtype,
                                jax.Array)):
            found, arrays = _rule_functions(v)
            private = private or arrays
            for f in found:
                d = _Describer(lenient=True)
                out.append(("bound", d.value(f.value, False)) if isinstance(f, _Bound)
                           else d.callable(f, arrays=False))
                private = private or d.opaque

    visit_jaxpr(jaxpr)
    return tuple(out), private


def hoist(fn: Callable, *example_args, argname: str | None = "fn",
          inputs: str = "x") -> tuple[Structure, list]:
    """``(structure, consts)`` of ``fn`` traced at ``example_args`` (arrays or ShapeDtypeStructs).

    ``structure.bind(consts)`` computes what ``fn`` computes. Raises a ``ValueError``
    naming ``argname`` when ``fn`` rejects the arguments (``argname=None``: the
    function's own error, unchanged).
    """
    try:
        # through a new function object: JAX caches traces by function object, and would
        # serve ``fn``'s trace from before a global it reads was reassigned (``W = ...``)
        closed, out_shape = jax.make_jaxpr(lambda *a: fn(*a), return_shape=True)(
            *example_args)
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


class _Fallback(Exception):
    """The function's structure cannot be read without tracing it."""


class _Ref:
    """An object compared and hashed by identity inside a structure key (kept alive)."""

    __slots__ = ("obj",)

    def __init__(self, obj):
        self.obj = obj

    def __hash__(self) -> int:
        return id(self.obj)

    def __eq__(self, other) -> bool:
        return isinstance(other, _Ref) and other.obj is self.obj


_LIBRARY_ROOTS = frozenset({  # their functions without user state are compared by identity
    "jax", "jaxlib", "flax", "numpy", "scipy", "optax", "chex", "einops", "ml_collections",
    "gne_jax", "builtins", "functools", "operator", "math", "itertools", "collections",
})


_DYNAMIC_LOOKUPS = frozenset({"globals", "vars", "locals", "eval", "exec", "__import__"})
_MODULE_LOOKUPS = frozenset({"sys", "importlib", "builtins"})  # modules that reach modules


@functools.lru_cache(maxsize=4096)
def _global_names(code: types.CodeType) -> tuple[str, ...]:
    """Every name ``code`` (and the code objects nested in it) may look up as a global.

    Only the global loads: an attribute ``self.d`` does not read a global ``d``. An
    ``import`` statement counts as ``__import__`` (a dynamic lookup).
    """
    names = set()
    for ins in dis.get_instructions(code):
        if ins.opname in ("LOAD_GLOBAL", "LOAD_NAME"):
            names.add(ins.argval)
        elif ins.opname == "IMPORT_NAME":  # ``import cfg`` in the body: a module's state
            names.add("__import__")
    for c in code.co_consts:
        if isinstance(c, types.CodeType):
            names.update(_global_names(c))
    return tuple(sorted(names))


def _is_library(obj) -> bool:
    """Whether ``obj`` (a function, class or module) belongs to a library package.

    A function belongs where its code was written (its globals), whatever ``__module__``
    a ``functools.wraps`` copied onto it: Flax's wrappers of a user's methods are Flax's.
    """
    if isinstance(obj, types.ModuleType):
        module = obj.__name__
    elif isinstance(obj, types.FunctionType):
        module = obj.__globals__.get("__name__") or ""
    else:
        module = getattr(obj, "__module__", None) or ""
    root = module.partition(".")[0]
    return root in _LIBRARY_ROOTS or _is_stdlib(root)


@functools.lru_cache(maxsize=1024)
def _stdlib_file(root: str, file: str | None) -> bool:
    if file is None:  # a built-in module
        return True
    stdlib = sysconfig.get_paths()["stdlib"]
    return os.path.abspath(file).startswith(os.path.abspath(stdlib) + os.sep) and (
        "site-packages" not in file)


def _is_stdlib(root: str) -> bool:
    """Whether the loaded top-level module ``root`` is the standard library's (a user's
    ``code.py`` shadowing a standard name is not)."""
    if root not in sys.stdlib_module_names:
        return False
    module = sys.modules.get(root)
    return module is not None and _stdlib_file(root, getattr(module, "__file__", None))


_CONTAINERS = (dict, list, tuple, type(None), collections.OrderedDict, collections.defaultdict)


def _dict_orders(v) -> tuple | None:
    """The dicts of a nest of dicts, lists and tuples whose keys a treedef does not fully
    tell (``_keys_note``), as ``(index among its dicts, note)``: a treedef sorts a dict's
    keys, while ``.values()`` and ``.items()`` go in insertion order (the order of the
    layers a function loops over). None when the nest reaches one of its own containers
    again (``jax.tree.flatten`` would recurse without end)."""
    if not isinstance(v, _WALKED) or not v:
        return ()
    found: list = []
    try:
        _walk_dicts(v, set(), found, 0)
    except (_Cycle, RecursionError):
        return None
    return tuple(found)


_WALKED = (dict, list, tuple)


class _Cycle(Exception):
    pass


def _walk_dicts(node, active: set, found: list, count: int) -> int:
    i = id(node)
    if i in active:
        raise _Cycle
    active.add(i)
    if isinstance(node, dict):
        count += 1
        note = _keys_note(tuple(node))
        if note is not None:
            found.append((count, note))
        children = node.values()
    else:
        children = node
    for c in children:
        if isinstance(c, _WALKED):
            count = _walk_dicts(c, active, found, count)
    active.discard(i)
    return count


_STR_KEYS: dict = {}  # key tuples of strings -> their note (a tuple: (note,))


def _keys_note(keys: tuple):
    """What a treedef does not tell of a mapping's keys: their order when not sorted, and
    their types and reprs when not all strings (``{0.0: w}`` and ``{-0.0: w}``, ``{1: w}``
    and ``{True: w}`` make equal treedefs). None when the treedef tells it all."""
    hit = _STR_KEYS.get(keys)  # (only string tuples are stored: no float key matches one)
    if hit is not None:
        return hit[0]
    if all(type(k) is str for k in keys):
        note = None if list(keys) == sorted(keys) else keys
        if len(_STR_KEYS) > 4096:
            _STR_KEYS.clear()
        _STR_KEYS[keys] = (note,)
        return note
    return tuple((type(k), repr(k)) for k in keys)


def _aux_risks(v, out: list) -> None:
    """Appends to ``out`` what in a pytree node's static data ``==`` cannot vouch for: a
    mutable container (it may change in place), a user's function, class or object."""
    if isinstance(v, (float, complex, np.generic)):  # == equates -0.0 with 0.0, 1.0 with 1
        out.append(v)  # and np.float16(2) with np.float32(2)
        return
    if v is None or isinstance(v, (bool, int, str, bytes, np.dtype)):
        return
    if isinstance(v, (tuple, frozenset)):
        for e in v:
            _aux_risks(e, out)
        return
    if isinstance(v, type):
        if not _is_library(v):
            out.append(v)
        return
    if isinstance(v, types.FunctionType):
        if not _fixed_library_function(v):
            out.append(v)
        return
    if isinstance(v, (list, dict, set, functools.partial, types.MethodType)) or not _is_library(
            type(v)) or (isinstance(v, types.ModuleType) and not _is_library(v)) or (
            isinstance(v, (jax.custom_jvp, jax.custom_vjp)) and not _library_callable(v)):
        out.append(v)
        return
    if isinstance(v, Mapping):  # a library's immutable mapping (FrozenDict, HashableMapping)
        for k, e in v.items():
            _aux_risks(k, out)
            _aux_risks(e, out)
        return
    try:
        hash(v)  # a library's immutable value (jnp.tanh...)
    except TypeError:
        out.append(v)


class _KeyOrders:
    """``_dict_orders`` of a tree whose mappings that walk does not reach (Flax's
    ``FrozenDict``, NNX's ``Dict``, a dict inside an NNX module or a dataclass node), met
    while flattening with ``is_leaf=note``."""

    __slots__ = ("found", "count")

    def __init__(self):
        self.found: tuple = ()
        self.count = 0

    def note(self, node) -> bool:
        if isinstance(node, Mapping):
            self.count += 1
            note = _keys_note(tuple(node))
            if note is not None:
                self.found += ((self.count, note),)
        return False


def _tree_parts(treedef) -> tuple[tuple[type, ...], list, bool]:
    """(the user's classes among the nodes, the risky static data of the other nodes,
    whether a mapping may lie beyond ``_dict_orders``' walk: the tree has a mapping and a
    node other than a builtin container)."""
    classes: dict[type, None] = {}
    risks: list = []
    mapping = other = False
    stack = [treedef]
    while stack:
        t = stack.pop()
        data = t.node_data()
        if data is not None:
            if isinstance(data[0], type):
                if _has_user_class(data[0]):
                    classes[data[0]] = None
                mapping = mapping or issubclass(data[0], Mapping)
            if data[0] not in _CONTAINERS:
                other = True
                _aux_risks(data[1], risks)
            elif data[0] is collections.defaultdict:  # (default_factory, keys)
                _aux_risks(data[1][0], risks)
        stack.extend(t.children())
    return tuple(classes), risks, mapping and other


# Structures whose nodes hold nothing to describe beyond ``==`` (the user classes among
# them, if any, and whether a mapping may lie beyond ``_dict_orders``' walk): looked up
# instead of walked. A tree with risky static data is walked at every call and never
# stored, so no user object is kept alive here.
_PLAIN_TREES: collections.OrderedDict = collections.OrderedDict()


def _plain_tree_classes(treedef):
    """``(user classes, non-builtin mappings?)`` of ``treedef`` when it is plain (cached),
    else None."""
    try:
        return _PLAIN_TREES.get(treedef)
    except TypeError:  # unhashable static data
        return None


def _has_user_class(cls: type) -> bool:
    """Whether ``cls`` or a base of it is the user's (Flax's ``nn.scan(Block)`` is a Flax
    class built on the user's ``Block``)."""
    return any(not _is_library(c) for c in cls.__mro__ if c is not object)


def _library_machinery(v) -> bool:
    """An opaque object a library puts on a user's class or instance, not the user's
    state: Flax's field descriptors, per-class module state and unbound-parent sentinel,
    a NamedTuple's field getters (a C descriptor), an ABC's registry. Any other object that
    cannot be described makes the description fall back."""
    cls = type(v)
    if callable(v) or isinstance(v, (jax.Array, np.ndarray, np.generic)):
        return False
    return ((cls.__module__.startswith("flax.")
             and jax.tree_util.treedef_is_leaf(jax.tree.structure(v)))
            or cls.__module__ in ("_abc", "_collections", "dataclasses")  # (its sentinels)
            or (_is_library(cls) and hasattr(cls, "__get__")))  # a library's descriptor


def _is_nnx_module(f) -> bool:
    try:
        from flax import nnx
    except ImportError:  # pragma: no cover
        return False
    return isinstance(f, nnx.Module)


def _library_callable(v, depth: int = 6, seen: frozenset = frozenset()) -> bool:
    """A library's own function, bare or as JAX wraps it (``jax.jit``, ``custom_jvp``:
    ``jnp.tanh``, ``jax.nn.relu``), with no user state: compared by identity."""
    if id(v) in seen:  # a cycle (a rule that calls its own function) adds no state
        return True
    if depth == 0 or not callable(v) or isinstance(v, type):
        return False
    seen = seen | {id(v)}
    if isinstance(v, types.FunctionType):
        return _fixed_library_function(v, depth, seen)
    if type(v) in (jax.custom_jvp, jax.custom_vjp):
        return all(_library_callable(getattr(v, r), depth - 1, seen)
                   for r in ("fun", "jvp", "fwd", "bwd") if getattr(v, r, None) is not None)
    if type(v).__module__.partition(".")[0] not in ("jax", "jaxlib"):
        return False
    wrapped = getattr(v, "__wrapped__", None)
    if wrapped is not None:
        return _library_callable(wrapped, depth - 1, seen)
    return _is_library(v)  # a jax object without a Python function inside


def _jitted(v):
    """The function a ``jax.jit`` wraps (``jax.jit(model.apply)``), else None. A jitted
    closure's own arrays are constants of its inner program: such a trace is private, and
    its description always traces (see ``hoist_fast``)."""
    if type(v).__name__ != "PjitFunction" or type(v).__module__.partition(".")[0] not in (
            "jax", "jaxlib"):
        return None
    return getattr(v, "__wrapped__", None)


def _fixed_library_function(f, depth: int = 6, seen: frozenset = frozenset()) -> bool:
    """A library function whose result depends on its arguments only: one without a
    closure, or a decorator's wrapper whose closure holds only such functions (JAX-wrapped
    or not) and Python constants (``flax.linen.Module.apply``, ``Dense.__call__``,
    ``jax.nn.relu``'s JVP rule). Compared by identity."""
    if not (isinstance(f, types.FunctionType) and _is_library(f)):
        return False
    seen = seen | {id(f)}
    return all(_fixed_cell(cell, depth - 1, seen) for cell in f.__closure__ or ())


def _fixed_cell(cell, depth: int, seen: frozenset) -> bool:
    try:
        v = cell.cell_contents
    except ValueError:  # an empty cell
        return False
    return _fixed_value(v, depth, seen)


def _fixed_value(v, depth: int, seen: frozenset) -> bool:
    if v is None or isinstance(v, (bool, int, float, str, bytes)):
        return True
    if isinstance(v, tuple):
        return depth > 0 and all(_fixed_value(e, depth - 1, seen) for e in v)
    return depth > 0 and _library_callable(v, depth, seen)


_BUILTIN_CALLABLES = (types.BuiltinFunctionType, types.WrapperDescriptorType,
                      types.MethodDescriptorType, types.ClassMethodDescriptorType)

_BOOKKEEPING = frozenset({  # dunders that do not compute on the arrays
    "__repr__", "__str__", "__eq__", "__ne__",
    "__hash__", "__setattr__", "__delattr__", "__init_subclass__", "__class_getitem__",
    "__getstate__", "__setstate__", "__reduce__", "__reduce_ex__", "__copy__", "__deepcopy__",
    "__getnewargs__", "__replace__",
})


def _described_dunder(name: str, attr) -> bool:
    """A dunder method of a user's class that may compute (``__call__``, ``__mul__``,
    ``__getattr__``...), not bookkeeping (what ``dataclasses`` generates among them)."""
    f = attr.__func__ if isinstance(attr, (staticmethod, classmethod)) else attr
    return isinstance(f, (types.FunctionType, property)) and name not in _BOOKKEEPING


def _linen_module(v) -> bool:
    try:
        import flax.linen as nn
    except ImportError:  # pragma: no cover
        return False
    return isinstance(v, nn.Module)


_DESCRIBED_BUILTINS = frozenset({object, bool, int, float, complex, str, bytes, dict, list,
                                 tuple, set, frozenset})
_PLAIN_BASICSIZE = type("_Plain", (), {}).__basicsize__  # a Python class with a __dict__


def _native_storage(cls: type) -> bool:
    """Whether a base of ``cls`` keeps state in C beyond attributes (``np.ndarray``,
    ``collections.deque``, ``bytearray``), which ``instance`` does not read. (Not cached:
    a cache would keep the user's classes, and what they hold, alive.)"""
    return any(c not in _DESCRIBED_BUILTINS and _is_library(c)
               and c.__basicsize__ > _PLAIN_BASICSIZE for c in cls.__mro__)


def _frozen_object(v) -> bool:
    """An unbound Flax Linen module or a frozen dataclass (described by its state)."""
    if _linen_module(v):
        return v.scope is None  # a bound module holds variables beside its fields
    params = getattr(type(v), "__dataclass_params__", None)
    return bool(params is not None and params.frozen)


def _plain_object(v) -> bool:
    """An instance of a user's class (not a function, module or class), or a namespace
    (``types.SimpleNamespace``, ``argparse.Namespace``): described by its attributes."""
    cls = type(v)
    if cls is types.SimpleNamespace or (cls.__name__ == "Namespace"
                                        and cls.__module__ == "argparse"):
        return True
    if _linen_module(v):  # unbound: ``_frozen_object``; bound: its scope holds variables
        return False
    return not _is_library(cls) and not isinstance(
        v, (type, types.ModuleType, types.FunctionType, types.MethodType, functools.partial))


class _Describer:
    """Reads a callable's structure; ``leaves`` collects its arrays (see ``callable``)."""

    MAX_NODES = 4096  # callables and objects visited at most, before falling back to tracing

    def __init__(self, lenient: bool = False):
        # lenient (a custom rule, a host callback): what cannot be described (an array, a
        # bound module) makes the program private instead of falling back
        self.lenient = lenient
        self.opaque = False
        self.leaves: list = []
        self.nodes = 0
        self.active: dict[int, int] = {}  # callables being described -> their depth
        self.classes: set[int] = set()  # user classes described (each once per description)

    def leaf(self, v, arrays: bool):
        try:
            return self._leaf(v, arrays)
        except _Fallback:
            if not self.lenient:
                raise
            self.opaque = True  # an array, a jitted closure's hidden ones, a bound module
            return ("opaque",)

    def _leaf(self, v, arrays: bool):
        if isinstance(v, jax.core.Tracer):
            raise _Fallback
        if isinstance(v, jax.Array):
            if not arrays:  # a global array is read by name, not passed: trace instead
                raise _Fallback
            self.leaves.append(v)
            return _array_key(v)
        if v is None or v is Ellipsis or type(v) in (bool, int, str, bytes):
            return ("const", type(v), v)
        if type(v) in (float, complex):  # repr tells -0.0 from 0.0 and equates NaNs
            return ("num", type(v), repr(v))
        if isinstance(v, np.generic):
            return ("np", v.dtype, v.tobytes())
        if isinstance(v, np.dtype):
            return ("const", np.dtype, v)
        if isinstance(v, types.ModuleType) and v.__name__ in _MODULE_LOOKUPS:
            raise _Fallback  # sys.modules[...], importlib.import_module(...): any module's state
        if isinstance(v, types.ModuleType) and _is_library(v) or (
                isinstance(v, type) and not _has_user_class(v)):
            return ("id", _Ref(v))  # a library module or class by identity
        if isinstance(v, type):
            return self.user_class(v)
        if isinstance(v, types.ModuleType):
            # a user's module could have its attributes reassigned (``cfg.scale = 2``)
            # under the same identity: trace
            raise _Fallback
        if isinstance(v, (types.FunctionType, functools.partial, types.MethodType)):
            return self.callable(v, arrays)
        if isinstance(v, _BUILTIN_CALLABLES) and (
                getattr(v, "__self__", None) is None
                or isinstance(v.__self__, (type, types.ModuleType))):
            return ("id", _Ref(v))  # C code (tuple.__new__, math.sqrt): no state of its own
        if _library_callable(v):
            return ("id", _Ref(v))  # jax's own wrapped functions (jnp.tanh, jax.nn.relu...)
        wrapped = _jitted(v)
        if wrapped is not None:  # jax.jit(apply) over the user's code: by what it wraps
            return ("jit", self.callable(wrapped, arrays))
        if type(v) in (jax.custom_jvp, jax.custom_vjp):  # (a user subclass: an object)
            return self._enter(v, self._custom_derivative, arrays)  # its function and rules
        if _frozen_object(v) or _plain_object(v):
            return self._enter(v, self.instance, arrays)
        if _library_machinery(v):  # Flax's sentinels and descriptors, a NamedTuple getter
            try:
                hash(v)
            except TypeError:
                return ("library value", type(v))  # skipped when mutable
            try:  # by equality, held weakly: the key keeps no object (nor its arrays) alive
                return ("library value", type(v), weakref.ref(v))
            except TypeError:
                return ("library value", type(v), v)
        raise _Fallback

    def instance(self, v, arrays: bool):
        """An object by its class and its current state, each attribute described (a
        function by its code, a submodule with its class, an array as data): an attribute
        changed in place changes the description. A Linen module by its fields."""
        cls = type(v)
        if _linen_module(v):
            state = [(f.name, getattr(v, f.name)) for f in dataclasses.fields(v)]
        else:
            state = sorted(vars(v).items()) if hasattr(v, "__dict__") else []
            state += [(n, getattr(v, n)) for c in cls.__mro__
                      for n in getattr(c, "__slots__", ()) if hasattr(v, n)]
        base = None  # a user subclass of a builtin: its value or contents too, read through
        # the builtin's own methods (a subclass may override __iter__ or values())
        if isinstance(v, (bool, int, float, complex, str, bytes)):
            builtin = next(b for b in cls.__mro__ if b in (bool, int, float, complex, str, bytes))
            base = ("base", builtin, builtin.__repr__(v))
        elif isinstance(v, dict):
            base = ("items", self.value(dict(dict.items(v)), arrays))
        elif isinstance(v, list):
            base = ("items", self.value(list(list.__iter__(v)), arrays))
        elif isinstance(v, tuple):
            base = ("items", self.value(list(tuple.__iter__(v)), arrays))
        elif isinstance(v, (set, frozenset)) or _native_storage(cls):
            raise _Fallback  # unordered, or contents held in C (ndarray, deque): not read
        return ("obj", self.user_class(cls) if _has_user_class(cls) else _Ref(cls),
                tuple((name, self.value(a, arrays)) for name, a in state), base)

    def user_class(self, cls: type):
        """A user's class by identity, with what its methods and class attributes hold now.

        Its methods' code reads globals (``ACT = jax.nn.relu`` edited in a notebook) and
        its class attributes can be reassigned, under the same class identity: both are
        part of the description. Library base classes count by identity.
        """
        if id(cls) in self.classes:  # described already (or being described: recursion)
            return ("class", _Ref(cls))
        self.classes.add(id(cls))
        parts = []
        if not _is_library(type(cls)):  # a user's metaclass (its __getattr__, attributes)
            parts.append(("metaclass", self.user_class(type(cls))))
        if dataclasses.is_dataclass(cls):  # defaults and default factories of its fields
            parts.append(("fields", tuple(
                (f.name,
                 None if f.default is dataclasses.MISSING else self.value(f.default, False),
                 None if f.default_factory is dataclasses.MISSING
                 else self.callable(f.default_factory, False))
                for f in dataclasses.fields(cls))))
        for c in cls.__mro__:
            if c is object or _is_library(c):
                continue
            for name, attr in vars(c).items():
                if name.startswith("__") and name.endswith("__") and not _described_dunder(
                        name, attr):
                    continue  # the class's bookkeeping (dataclass methods, annotations...)
                parts.append((name, self._class_attribute(attr)))
        return ("class", _Ref(cls), tuple(parts))

    def _class_attribute(self, attr):
        if isinstance(attr, (staticmethod, classmethod)):
            attr = attr.__func__
        if isinstance(attr, functools.partialmethod):
            return ("partialmethod", self.callable(attr.func, False),
                    self.value(attr.args, False), self.value(attr.keywords, False))
        if isinstance(attr, functools.cached_property):
            return ("cached_property", self.callable(attr.func, False))
        if isinstance(attr, property):
            return ("property", *(None if f is None else self.callable(f, False)
                                  for f in (attr.fget, attr.fset)))
        if isinstance(attr, types.FunctionType):
            return self.callable(attr, False)
        return self.value(attr, False)

    def value(self, v, arrays: bool):
        orders = _dict_orders(v)
        if orders is None:  # jax.tree.flatten would recurse without end
            raise _Fallback
        flat, treedef = jax.tree.flatten(v)
        array_type = _array_type()
        described = []
        for a in flat:  # a concrete array (the common leaf: a weight) without the generic path
            if arrays and type(a) is array_type:
                self.leaves.append(a)
                described.append(a.aval)  # what _array_key gives, without the call
            else:
                described.append(self.leaf(a, arrays))
        parts = _plain_tree_classes(treedef)
        risks: list = []
        if parts is None:
            classes, risks, mappings = _tree_parts(treedef)
            if not risks:
                with _LOCK:
                    _PLAIN_TREES[treedef] = (classes, mappings)
                    while len(_PLAIN_TREES) > 4 * MAX_PROGRAMS:
                        _PLAIN_TREES.popitem(last=False)
        else:
            classes, mappings = parts
        if mappings:  # a FrozenDict, a dict in an NNX module: met by flattening again
            every = _KeyOrders()
            jax.tree.flatten(v, is_leaf=every.note)
            orders = every.found
        if classes or risks:  # an NNX module's classes, a user's pytree class, a function
            return ("tree", treedef, tuple(described),  # or a list in static fields
                    tuple(self.user_class(c) for c in classes),
                    tuple(self.value(r, False) if isinstance(r, (list, dict))
                          else self.leaf(r, False) for r in risks), orders)
        if orders:
            return ("tree", treedef, tuple(described), orders)
        return ("tree", treedef, tuple(described))

    def callable(self, f, arrays: bool = True):
        """A hashable description of ``f`` that determines what it computes from its arrays.

        ``arrays=False`` (globals): an array anywhere inside makes it fall back.
        """
        return self._enter(f, self._callable, arrays)

    def _enter(self, f, describe, arrays):
        """``describe(f, arrays)``, or a back-reference when ``f`` is being described (a
        recursive function, a custom-derivative rule that calls its function)."""
        self.nodes += 1
        if self.nodes > self.MAX_NODES:
            raise _Fallback
        if id(f) in self.active:
            return ("cycle", self.active[id(f)])
        self.active[id(f)] = len(self.active)
        try:
            return describe(f, arrays)
        finally:
            del self.active[id(f)]

    def _custom_derivative(self, v, arrays):
        rules = ("jvp",) if isinstance(v, jax.custom_jvp) else ("fwd", "bwd")
        return (type(v).__name__, self.callable(v.fun, arrays), v.nondiff_argnums,
                getattr(v, "symbolic_zeros", None),
                tuple(None if getattr(v, r, None) is None else self.callable(getattr(v, r), arrays)
                      for r in rules))

    def _callable(self, f, arrays):
        if isinstance(f, functools.partial):
            return ("partial", self.callable(f.func, arrays), self.value(f.args, arrays),
                    self.value(f.keywords, arrays),  # a user subclass: its class and state
                    None if type(f) is functools.partial else self.instance(f, arrays))
        if isinstance(f, types.MethodType):
            return ("method", self.callable(f.__func__, arrays), self.value(f.__self__, arrays))
        if not isinstance(f, types.FunctionType):
            wrapped = _jitted(f)
            if wrapped is not None:  # a jitted function passed as fn
                return ("jit", self.callable(wrapped, arrays))
            if _is_nnx_module(f):  # a pytree: its arrays, structure and classes describe it
                return ("pytree call", self.value(f, arrays))
            if _frozen_object(f) or _plain_object(f):  # its class's __call__ and its state
                return ("object call", self.instance(f, arrays))
            raise _Fallback
        if _fixed_library_function(f):
            return ("id", _Ref(f))
        if f.__name__ in ("__init__", "__new__") and f.__code__.co_filename == "<string>":
            # generated by dataclasses or namedtuple: its defaults (the default factories
            # are described with the class's fields)
            defaults, kwdefaults = f.__defaults__, f.__kwdefaults__
            return ("generated", f.__code__,
                    None if defaults is None else self.value(defaults, False),
                    None if kwdefaults is None else self.value(kwdefaults, False))
        code, glob = f.__code__, f.__globals__
        try:
            cells = tuple(c.cell_contents for c in f.__closure__ or ())
        except ValueError:  # an empty cell (a closure over a name not yet assigned)
            raise _Fallback from None
        library = _is_library(f)
        names = _global_names(code)
        own_builtins = glob.get("__builtins__")
        if not library and (not _DYNAMIC_LOOKUPS.isdisjoint(names) or (
                own_builtins is not builtins and own_builtins is not builtins.__dict__)):
            # globals() / vars() / eval / import: names read other than by name; or
            # builtins of its own (``exec`` with a ``__builtins__``)
            raise _Fallback
        # A library's globals are fixed. The globals dict itself is not part of the
        # description (nor kept alive): equal code reading equal values computes the same.
        described = () if library else tuple(
            (name, self.value(glob[name], False)) for name in names if name in glob)
        defaults, kwdefaults = f.__defaults__, f.__kwdefaults__
        return ("fn", code, f.__name__,
                None if defaults is None else self.value(defaults, arrays),
                None if kwdefaults is None else self.value(kwdefaults, arrays),
                tuple(self.value(c, arrays) for c in cells), described,
                self.value(f.__dict__, False) if f.__dict__ and not library else None)


@functools.cache
def _array_type() -> type:
    """The class of concrete ``jax.Array``\\ s (a private name in jax, read from an instance
    made without compiling anything)."""
    return type(jax.device_put(np.zeros((), np.float32)))


_FAST: collections.OrderedDict = collections.OrderedDict()


def _array_key(a):
    """An array's abstract value as a cache key: a concrete array's ``aval`` (shape, dtype,
    weak type, sharding), else (shape, dtype, weak type)."""
    if type(a) is _array_type():
        return a.aval
    return tuple(np.shape(a)), jax.numpy.result_type(a), bool(getattr(a, "weak_type", False))


def _aval_key(tree):
    leaves, treedef = jax.tree.flatten(tree)
    return treedef, tuple(_array_key(a) for a in leaves)


def _alias_pattern(leaves) -> tuple[int, ...] | None:
    """For each leaf, the index of the first leaf that is the same array object (None when
    all are distinct, the common case)."""
    ids = [id(a) for a in leaves]
    if len(set(ids)) == len(ids):
        return None
    first: dict[int, int] = {}
    return tuple(first.setdefault(i, n) for n, i in enumerate(ids))


class _HashedKey:
    """A tuple key whose hash is computed once (it is looked up and moved in the LRU)."""

    __slots__ = ("key", "hash")

    def __init__(self, key: tuple):
        self.key = key
        self.hash = hash(key)

    def __hash__(self) -> int:
        return self.hash

    def __eq__(self, other) -> bool:
        return isinstance(other, _HashedKey) and self.hash == other.hash and self.key == other.key


_TRACE_CONFIG = ("jax_enable_x64", "jax_default_matmul_precision", "jax_numpy_rank_promotion",
                 "jax_numpy_dtype_promotion")


def _trace_config() -> tuple:
    """The JAX settings a trace depends on: those ``jax.jit`` keys its own cache on (x64,
    matmul precision, promotion rules, the PRNG implementation and its flags...)."""
    try:
        from jax._src.config import trace_context
    except ImportError:  # pragma: no cover - a JAX without it: the main ones
        return tuple(getattr(jax.config, name) for name in _TRACE_CONFIG)
    return trace_context()


def _library_context_active() -> bool:
    """Whether a library context that changes what a trace computes is active (Flax's
    ``nn.intercept_methods``): its functions are read while tracing, not described."""
    module = sys.modules.get("flax.linen.module")
    stack = getattr(module, "_global_interceptor_stack", None)
    try:
        return bool(stack is not None and len(stack))
    except TypeError:  # pragma: no cover - another Flax: be safe
        return True


def _const_order(leaves: list, consts: list) -> tuple[int, ...] | None:
    """For each constant of a trace, the index of the collected array it is (None when
    one is none of them)."""
    index = {id(a): i for i, a in reversed(list(enumerate(leaves)))}
    order = [index.get(id(c)) for c in consts]
    return None if None in order else tuple(order)


def hoist_fast(fn: Callable, *example_args, argname: str | None = "fn",
               inputs: str = "x") -> tuple[Structure, list]:
    """``hoist``, without tracing ``fn`` again when its structure can be read from its code.

    The first call of a description traces ``fn`` (validation, output shapes) and
    records which of the arrays found in its closures are the jaxpr's constants, in
    which order; later calls with a function of the same description (and the same
    pattern of repeated arrays) only collect their arrays. The first later call with
    other arrays traces once more to check that the trace does not read the arrays'
    values (``float(w.max())``, ``np.asarray(w)`` in the function): one that does is
    traced at every call. Returns the same ``Structure`` as ``hoist``, so every form of
    one computation shares its program.
    """
    if _library_context_active():
        return hoist(fn, *example_args, argname=argname, inputs=inputs)
    describer = _Describer()
    try:
        spec = describer.callable(fn)
        leaves = describer.leaves
        key = _HashedKey((spec, _alias_pattern(leaves), _aval_key(example_args),
                          _trace_config()))
    except Exception:  # noqa: BLE001 - _Fallback, an unhashable value, an odd object: trace
        return hoist(fn, *example_args, argname=argname, inputs=inputs)
    with _LOCK:
        entry = _FAST.get(key)
        if entry is not None:
            _FAST.move_to_end(key)
    if entry is not None and entry[1] is not None:
        structure, order, first = entry
        if first is None or all(r() is a for r, a in zip(first, leaves, strict=True)):
            return structure, [leaves[i] for i in order]
        traced, consts = hoist(fn, *example_args, argname=argname, inputs=inputs)
        # verified (the same jaxpr, whose constants are the same arrays), or
        # value-dependent (a value chose the jaxpr or which array it reads): traced from now on
        same = traced == structure and _const_order(leaves, consts) == order
        with _LOCK:
            _FAST[key] = (structure, order if same else None, None)
        return traced, consts
    structure, consts = hoist(fn, *example_args, argname=argname, inputs=inputs)
    if entry is None:
        # a constant that is none of the collected arrays (made while tracing, e.g. from
        # a NumPy array), or a program with private parts: this description always traces
        order = None if structure.private else _const_order(leaves, consts)
        # the arrays of this first call, held weakly until a call with others checks
        # that the trace does not depend on their values
        first = tuple(weakref.ref(a) for a in leaves) if order is not None and leaves else None
        with _LOCK:  # (a private structure is not kept: its jaxpr holds arrays)
            _FAST[key] = (None if structure.private else structure, order, first)
            while len(_FAST) > 4 * MAX_PROGRAMS:
                _FAST.popitem(last=False)
    return structure, consts


def hoist_at_input(fn: Callable, x, *others) -> tuple[Structure | None, list | None, Any]:
    """``(structure, consts, output ShapeDtypeStructs)`` of ``fn`` at its input ``x``, the
    eager entry points' first step. ``structure`` and ``consts`` are None when ``x``,
    ``others`` (keys, parameters) or an array ``fn`` closes over is traced: under an outer
    jit/vmap/grad the caller computes inline."""
    if not is_concrete((x, *others)):
        return None, None, output_shape(fn, x)
    structure, consts = hoist_fast(fn, x, argname="fn")
    if not is_concrete(consts):
        return None, None, structure.out_shape
    return structure, consts, structure.out_shape


_PROGRAMS: collections.OrderedDict = collections.OrderedDict()
_LOCK = threading.Lock()


def probe_compiler_options(platform: str | None = None) -> dict[str, Any] | None:
    """XLA options for the probe programs: LLVM ``-O1`` on CPU, none elsewhere.

    Probe programs of small conv nets are compile-bound on CPU. Their heavy ops (convs,
    matmuls) are library calls that LLVM's optimization level does not touch, so ``-O1``
    compiles the 32-layer CNN's measurement 1.3–1.5× and its init 2.4–3× faster; run
    time moved between 14% faster (CNN) and 5–12% slower (MLP, width 256)
    (``benchmarks/probe_job_cost.py``). The Lanczos programs (eigenpairs, densities)
    compile 5–14% faster with it, at the same run time within noise.
    """
    platform = platform or jax.default_backend()
    return {"xla_backend_optimization_level": 1} if platform == "cpu" else None


def _options_key(compiler_options):
    return None if compiler_options is None else tuple(sorted(compiler_options.items()))


def program(impl: Callable, static: tuple, structures: tuple[Structure, ...],
            compiler_options: dict | None = None):
    """The jitted ``(consts_list, *args) -> impl(*fns, *args, **dict(static))``, cached
    (except for a structure with private arrays: compiled for this call only, as a new
    ``jax.jit`` of the user's jitted closure would be, and not kept)."""
    # the trace settings too: a jaxpr that prints alike can lower differently (the PRNG
    # flags), and a jitted program's own dispatch cache does not always tell them apart
    key = (impl, static, structures, _options_key(compiler_options), _trace_config())
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
    if any(st.private for st in structures):
        return prog
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
      fns: ``(fn, example_args, argname[, inputs])`` for each user function; ``fn`` is
        traced at ``example_args`` (arrays or ``jax.ShapeDtypeStruct``) and its closed-over
        arrays become arguments of the program; errors name ``argname`` and the example
        argument ``inputs`` (default ``"x"``).
      args: the program's array arguments (inputs, keys).

    When a function closes over traced values or ``args`` are traced (an outer
    ``jit``/``vmap``), ``impl`` is called directly on the original functions instead.
    """
    hoisted = [hoist_fast(f, *ex, argname=name, inputs=inputs[0] if inputs else "x")
               for f, ex, name, *inputs in fns]
    if not is_concrete([c for _, c in hoisted], args):
        # a function closes over traced values (under an outer transformation): inline
        return impl(*[f for f, *_ in fns], *args, **static)
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
    """Drops every cached program (and with it their compiled executables) and structure."""
    with _LOCK:
        _PROGRAMS.clear()
        _FAST.clear()


def num_programs() -> int:
    """How many programs the cache holds."""
    return len(_PROGRAMS)
