"""The parameter tree's one dialect: `"a/b/c"` keys, flat views, scanned-layer stacking,
logical names and abstract init. Checkpoints, PEFT, conversion and sharding all use it.

Parameters are plain nested dicts of arrays. A leaf's key is its path joined with '/'
(`decoder/layers/attention/query/kernel`); `flatten` / `unflatten` go between the nested
tree and {key: leaf}. `flatten` walks any pytree (optimizer states' tuples and lists give
`opt_state/0/mu/...`); `unflatten` builds nested dicts (numeric parts stay string keys).
Code that looks at the parts of a path (the last name, whether it is under `layers`) uses
`flatten_parts` / `unflatten_parts`: the same paths as tuples, `tuple(key.split('/'))`, in
the tree's own order. With `scan_layers` the layers are one `layers` subtree whose leaves
carry a leading layer axis; `unstack_layers` gives `layers_0 ... layers_{n-1}` (an unrolled
model's paths) and `stack_layers` is its inverse.
"""
from __future__ import annotations

import re
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

SEP = "/"
Params = dict


# ---------------------------------------------------------------- keys

def path_str(path) -> str:
    """'a/b/0/c' of a path: a jax key path (dict keys, sequence indices, attribute names)
    or a tuple of names."""
    parts = []
    for k in path:
        for attr in ("key", "idx", "name"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return SEP.join(parts)


def parts(key: str) -> tuple:
    """'a/b/c' -> ('a', 'b', 'c')."""
    return tuple(key.split(SEP))


# ---------------------------------------------------------------- flat views

def flatten(tree: Any, is_leaf: Optional[Callable[[Any], bool]] = None) -> dict[str, Any]:
    """{'a/b/c': leaf} of any pytree (jax's leaf order; None and empty subtrees vanish)."""
    return {path_str(p): leaf
            for p, leaf in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]}


def unflatten(flat: dict[str, Any]) -> Params:
    """{'a/b': x} -> {'a': {'b': x}}: nested plain dicts (numeric parts stay string keys)."""
    out: dict = {}
    for key, value in flat.items():
        node = out
        names = key.split(SEP)
        for name in names[:-1]:
            node = node.setdefault(name, {})
        node[names[-1]] = value
    return out


def flatten_parts(tree: Any) -> dict[tuple, Any]:
    """{('decoder', 'layers', 'mlp', 'wo', 'kernel'): leaf} of nested dicts, in the tree's
    own (insertion) order; empty subtrees vanish."""
    from flax import traverse_util
    if not tree:
        return {}
    return traverse_util.flatten_dict(dict(tree))


def unflatten_parts(flat: dict[tuple, Any]) -> Params:
    """Inverse of flatten_parts: nested plain dicts."""
    from flax import traverse_util
    if not flat:
        return {}
    return _plain(traverse_util.unflatten_dict(flat))


def _plain(tree: Any) -> Any:
    if isinstance(tree, dict):
        return {k: _plain(v) for k, v in tree.items()}
    return tree


# ---------------------------------------------------------------- scanned layers

_LAYERS = re.compile(r"^layers_(\d+)$")


def is_scanned(path: tuple) -> bool:
    """Leaves under a scanned stack ('layers') carry a leading layer axis."""
    return "layers" in path


def unstack_layers(params: Params) -> Params:
    """Scanned tree (`.../layers/...` with a leading layer axis) -> `.../layers_i/...`."""
    out = {}
    for key, value in params.items():
        if key == "layers" and isinstance(value, dict):
            n = jax.tree.leaves(value)[0].shape[0]
            for i in range(n):
                out[f"layers_{i}"] = jax.tree.map(lambda x, i=i: x[i], value)
        elif isinstance(value, dict):
            out[key] = unstack_layers(value)
        else:
            out[key] = value
    return out


def stack_layers(params: Params) -> Params:
    """Inverse of unstack_layers: `.../layers_i/...` -> `.../layers/...` stacked on axis 0."""
    out, layers = {}, {}
    for key, value in params.items():
        match = _LAYERS.match(key)
        if match and isinstance(value, dict):
            layers[int(match.group(1))] = value
        elif isinstance(value, dict):
            out[key] = stack_layers(value)
        else:
            out[key] = value
    if layers:
        ordered = [layers[i] for i in sorted(layers)]
        out["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *ordered)
    return out


def is_stacked(params: Params) -> bool:
    """Whether a tree holds a scanned `layers` subtree."""
    return any("layers" in path for path in flatten_parts(params))


# ---------------------------------------------------------------- logical names

def logical_names(boxed: Any) -> dict[tuple, tuple]:
    """{path parts: logical axis names} of a boxed (nn.Partitioned) parameter tree, as the
    model declares them (a scanned stack's leading axis included)."""
    import flax.linen as nn
    specs = nn.get_partition_spec(boxed)
    return {tuple(k.key for k in path): tuple(spec) for path, spec in
            jax.tree_util.tree_flatten_with_path(specs, is_leaf=lambda x: isinstance(x, P))[0]}


def tree_names(tree: Params, names: dict[tuple, tuple],
               extra: Optional[Callable[[tuple, tuple], tuple]] = None) -> Any:
    """Logical names for every leaf of `tree`: by path, else `extra(path, shape)`, else none."""
    def one(path, leaf):
        key = tuple(k.key for k in path)
        if key in names and len(names[key]) == len(leaf.shape):
            return P(*names[key])
        if extra is not None:
            found = extra(key, leaf.shape)
            if found is not None:
                return P(*found)
        return P(*([None] * len(leaf.shape)))
    return jax.tree_util.tree_map_with_path(one, tree)


# ---------------------------------------------------------------- init

def init_variables(module: Any, rng: jax.Array, *args, method=None, **kwargs) -> Any:
    """`module.init` with `rng` as its params and dropout streams (boxed variables)."""
    return module.init({"params": rng, "dropout": rng}, *args, method=method, **kwargs)


def abstract_variables(module: Any, *args, method=None, **kwargs) -> Any:
    """Shapes and dtypes (boxed) of every variable collection of `module.init(*args)`,
    without allocating anything: the one abstract init."""
    return jax.eval_shape(lambda rng: init_variables(module, rng, *args, method=method, **kwargs),
                          jax.random.key(0))
