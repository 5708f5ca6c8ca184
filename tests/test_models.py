"""Models: configs, output shapes, block structure vs apply, closed forms, bad configs.

Compiles dominate the run time on CPU, so every check jits one function with
XLA's backend optimizations off (``FAST``), and the sizes are tiny (8×8 images,
batch 2-4). The full cross product of families × normalizations is ``slow``.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gne_jax.models import MODEL_NAMES, create_model, default_config
from gne_jax.probes.blocks import compose_blocks

FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
KEY = jax.random.key(0)

# Tiny members of each family; the keys are overridden per test.
TINY = {
    "mlp": dict(name="mlp", depth=3, width=8, num_classes=5),
    "serial_cnn": dict(name="serial_cnn", depth=8, widths=(4, 8, 8), num_classes=5),
    "resnet_cifar": dict(name="resnet_cifar", depth=14, widths=(4, 8, 8), num_classes=5),
    "resnet50": dict(name="resnet50", stage_sizes=(1, 2, 1, 1), width=4, num_classes=5),
    "densenet_bc": dict(name="densenet_bc", growth_rate=4, block_sizes=(2, 1, 1), num_classes=5),
    "conv_mobilenet": dict(name="conv_mobilenet", width_multiplier=1 / 16, num_classes=5),
}
NORMS = {
    "mlp": ("none", "batchnorm", "smn", "smn_l1", "sws", "weightnorm", "meanonly", "meterez"),
    "serial_cnn": ("none", "batchnorm", "smn", "smn_l1", "sws", "weightnorm", "meanonly"),
    "resnet_cifar": ("none", "batchnorm", "smn", "smn_l1", "sws", "weightnorm", "meanonly"),
    "resnet50": ("none", "batchnorm", "smn", "smn_l1", "sws", "weightnorm", "meanonly"),
    "densenet_bc": ("none", "batchnorm", "smn", "smn_l1", "sws", "weightnorm", "meanonly"),
    "conv_mobilenet": ("none", "batchnorm", "smn", "smn_l1", "sws", "weightnorm", "meanonly"),
}
# Run by default: each family's default normalization and one per-batch-statistic kind.
DEFAULT_RUN = {
    ("mlp", "none"),
    ("mlp", "batchnorm"),
    ("mlp", "meterez"),
    ("serial_cnn", "none"),
    ("serial_cnn", "smn"),
    ("resnet_cifar", "batchnorm"),
    ("resnet_cifar", "smn"),
    ("resnet50", "batchnorm"),
    ("densenet_bc", "batchnorm"),
    ("conv_mobilenet", "sws"),
}


def _input(name, batch=4, size=None):
    size = size or (32 if name in ("resnet50", "conv_mobilenet") else 8)
    shape = (batch, 8) if name == "mlp" else (batch, size, size, 3)
    return jax.random.normal(jax.random.key(1), shape)


def _num_params(tree):
    return sum(math.prod(a.shape) for a in jax.tree.leaves(tree))


def _init(model, x):
    return jax.jit(functools.partial(model.init, train=False), compiler_options=FAST)(KEY, x)


def _outputs(model, variables, x):
    """(apply, composed blocks) in eval mode, train mode, and eval after a stats update."""

    def run(variables, x):
        eval_out = model.apply(variables, x, train=False)
        eval_blk = compose_blocks(model.blocks(variables, x, train=False), x)
        train_out, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
        train_blk = compose_blocks(model.blocks(variables, x, train=True), x)
        moved = {**variables, **updates}  # running statistics moved away from their init
        moved_out = model.apply(moved, 2.0 * x, train=False)
        moved_blk = compose_blocks(model.blocks(moved, 2.0 * x, train=False), 2.0 * x)
        return (eval_out, eval_blk), (train_out, train_blk), (moved_out, moved_blk)

    return jax.jit(run, compiler_options=FAST)(variables, x)


def _abstract_blocks(model, variables, x, train=False):
    """Groups with ShapeDtypeStruct params/inputs, traced without running anything."""
    static = []

    def run(v, x):
        groups = model.blocks(v, x, train=train)
        static.extend(groups)
        return [(g.params, g.inputs) for g in groups]

    arrays = jax.eval_shape(run, variables, x)
    return [g._replace(params=p, inputs=i) for g, (p, i) in zip(static, arrays, strict=True)]


def _check_model(config, out_dim, x):
    model = create_model(config)
    variables = _init(model, x)
    for out, blk in _outputs(model, variables, x):
        assert out.shape == (x.shape[0], out_dim)
        assert bool(jnp.all(jnp.isfinite(out)))
        np.testing.assert_allclose(blk, out, rtol=1e-6, atol=1e-6)
    return model, variables


def _cases():
    for fam, norms in NORMS.items():
        for norm in norms:
            marks = () if (fam, norm) in DEFAULT_RUN else (pytest.mark.slow,)
            yield pytest.param(fam, norm, marks=marks, id=f"{fam}-{norm}")


@pytest.mark.parametrize("family,normalization", list(_cases()))
def test_blocks_compose_to_apply(family, normalization):
    """Output shape, and composing the exposed blocks = apply to 1e-6 (eval, train, moved stats)."""
    x = _input(family)
    config = {**TINY[family], "normalization": normalization}
    _check_model(config, TINY[family]["num_classes"], x)


@pytest.mark.parametrize(
    "config",
    [
        dict(name="mlp", depth=4, width=8, residual="pre", residual_scale=0.5, activation="prelu"),
        dict(name="mlp", depth=4, width=8, residual="post", normalization="batchnorm"),
        dict(
            name="resnet_cifar",
            depth=8,
            widths=(4, 8, 8),
            normalization="none",
            fixup_p=2.0,
            fixup_scalars=True,
            activation="leaky_relu",
            negative_slope=0.3,
        ),
        dict(
            name="resnet50",
            stage_sizes=(1, 2, 1, 1),
            width=2,
            normalization="none",
            fixup="original",
            fixup_scalars=True,
        ),
        dict(name="densenet_bc", growth_rate=3, block_sizes=(1, 1, 1), normalization="smn"),
    ],
    ids=["mlp-pre", "mlp-post", "resnet-fixup", "resnet50-fixup", "densenet"],
)
def test_residual_groups_branch_plus_shortcut(config):
    """For every residual block: shortcut(h) + branch(h) = block(h) (identity when None)."""
    model = create_model({**config, "num_classes": 3})
    x = _input(config["name"])
    variables = _init(model, x)

    def residual_errors(variables, x, train):
        errs = []
        for g in model.blocks(variables, x, train=train):
            if not g.is_residual:
                continue
            sc = g.shortcut or (lambda p, h: h)
            both = jax.vmap(lambda p, h, g=g, sc=sc: sc(p, h) + g.branch(p, h))(g.params, g.inputs)
            full = jax.vmap(g.apply)(g.params, g.inputs)
            errs.append(jnp.max(jnp.abs(both - full)))
        return jnp.stack(errs)

    for train in (False, True):
        errs = jax.jit(residual_errors, static_argnums=2, compiler_options=FAST)(
            variables, x, train
        )
        assert errs.size > 0
        assert float(errs.max()) < 1e-6


def test_block_names_and_stacking():
    model = create_model(TINY["resnet_cifar"])
    x = _input("resnet_cifar", batch=2)
    variables = jax.eval_shape(functools.partial(model.init, train=False), KEY, x)
    groups = _abstract_blocks(model, variables, x)
    names = [n for g in groups for n in g.names]
    n = (14 - 2) // 6
    expected = ["stem"]
    expected += [f"stage{s}.block{i}" for s in (1, 2, 3) for i in range(1, n + 1)]
    assert names == expected + ["head"]
    for g in groups:
        for leaf in jax.tree.leaves(g.params):
            assert leaf.shape[0] == g.size
        assert g.inputs.shape[0] == g.size
    # the homogeneous runs (blocks 2..n of a stage) are one group each
    assert [g.size for g in groups] == [1, 1, n - 1, 1, n - 1, 1, n - 1, 1]
    # stage1.block1 has the identity shortcut; the other residual blocks S∘act
    assert groups[1].is_residual and groups[1].shortcut is None
    assert all(g.is_residual and g.shortcut is not None for g in groups[2:-1])


def test_serial_cnn_layers_and_groups():
    """6n + 2 weight layers: stem, 6n convs, linear; conv bias only without normalization."""
    for depth in (8, 20, 32):
        for norm, bias in (("none", True), ("batchnorm", False)):
            model = create_model(dict(name="serial_cnn", depth=depth, normalization=norm))
            x = jnp.zeros((2, 32, 32, 3))
            v = jax.eval_shape(functools.partial(model.init, train=False), KEY, x)
            kernels = [
                a
                for p, a in jax.tree_util.tree_leaves_with_path(v["params"])
                if p[-1].key == "kernel"
            ]
            layers = sum(a.shape[0] if a.ndim in (3, 5) else 1 for a in kernels)
            assert layers == depth
            conv_biases = [
                p
                for p, _ in jax.tree_util.tree_leaves_with_path(v["params"])
                if p[-1].key == "bias" and p[-2].key == "conv"
            ]
            assert bool(conv_biases) == bias
            groups = _abstract_blocks(model, v, x)
            n = (depth - 2) // 6
            assert [g.size for g in groups] == [1, 2 * n, 1, 2 * n - 1, 1, 2 * n - 1, 1]
            assert groups[-1].inputs.shape[1:] == (2, 8, 8, 64)  # avg-pool 8 at 32×32


def test_resnet56_parameter_count():
    """ResNet-56 (option-A shortcuts, BN) has 853,018 ≈ 0.85 M parameters."""
    model = create_model(dict(name="resnet_cifar", depth=56))
    v = jax.eval_shape(functools.partial(model.init, train=False), KEY, jnp.zeros((1, 32, 32, 3)))
    count = _num_params(v["params"])
    # 3 + 9·2 + 18·2 + ... : closed form of the torch model
    convs = 3 * 9 * 16 + sum(9 * 2 * 9 * w * w for w in (16, 32, 64)) - 9 * (16 * 32 + 32 * 64)
    bns = 2 * (16 + sum(2 * 9 * w for w in (16, 32, 64)))
    assert count == convs + bns + 64 * 10 + 10
    assert abs(count - 0.85e6) < 0.01e6


def test_fixup_branch_init_scale():
    """Both branch convs: std = √2/√fan_in · L^(−p/(2m)), L = 3n, m = 2 (derivations §13)."""
    p = 2.0
    model = create_model(
        dict(name="resnet_cifar", depth=56, normalization="none", fixup_p=p, fixup_scalars=True)
    )
    v = _init(model, jnp.zeros((1, 8, 8, 3)))
    L = 27
    for conv in ("conv1", "conv2"):
        k = np.asarray(v["params"]["stage3"][conv]["kernel"])  # (8, 3, 3, 64, 64)
        fan_in = 9 * 64
        want = math.sqrt(2.0 / fan_in) * L ** (-p / 4)
        # sample std of k.size Gaussians: relative SE ≈ 1/√(2N)
        assert abs(k.std() / want - 1) < 4 / math.sqrt(2 * k.size)
    scal = v["params"]["stage3"]
    np.testing.assert_array_equal(scal["scale"], np.ones(8))
    np.testing.assert_array_equal(scal["bias1a"], np.zeros(8))


def test_mlp_blocks_closed_form():
    """Hidden blocks against their formulas written with the stored kernels."""
    x = _input("mlp")
    for residual, a in (("none", 1.0), ("post", 0.7), ("pre", 0.3)):
        model = create_model(
            dict(
                name="mlp", depth=2, width=8, residual=residual, residual_scale=a, activation="tanh"
            )
        )
        v = _init(model, x)
        w0 = v["params"]["input"]["dense"]["kernel"]
        ws = v["params"]["hidden"]["dense"]["kernel"]
        h = x @ w0
        for w in ws:
            if residual == "none":
                h = jnp.tanh(h @ w)
            elif residual == "post":
                h = h + a * jnp.tanh(h @ w)
            else:
                h = h + a * (jnp.tanh(h) @ w)
        want = h @ v["params"]["head"]["dense"]["kernel"]
        got = jax.jit(model.apply, compiler_options=FAST)(v, x)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_meterez_mlp_rows_have_unit_norm_and_shaped_gains():
    """Meterez construction: orthogonal W, BN(X) = diag(XXᵀ)^(−1/2)X, shaped tanh σ(ℓ^(−p)x)."""
    width, p = 8, 0.4
    model = create_model(
        dict(
            name="mlp",
            depth=3,
            width=width,
            init="orthogonal",
            normalization="meterez",
            activation="shaped_tanh",
            shaped_exponent=p,
            input_layer=False,
            num_classes=None,
        )
    )
    x = jax.random.normal(jax.random.key(3), (width, width))  # batch = width
    v = _init(model, x)
    ws = v["params"]["hidden"]["dense"]["kernel"]
    np.testing.assert_allclose(ws[1].T @ ws[1], np.eye(width), atol=1e-5)
    h = x
    for ell, w in enumerate(ws, start=1):
        z = h @ w
        z = z / jnp.linalg.norm(z, axis=0, keepdims=True)  # each feature over the batch
        h = jnp.tanh(ell ** (-p) * z)
    apply = functools.partial(model.apply, train=True, mutable=["batch_stats"])
    out, _ = jax.jit(apply, compiler_options=FAST)(v, x)
    np.testing.assert_allclose(out, h, rtol=1e-5, atol=1e-6)


def test_default_configs_build():
    for name in MODEL_NAMES:
        cfg = default_config(name)
        assert cfg.name == name
        model = create_model(cfg)
        assert hasattr(model, "blocks")
        cfg.gain = 1.5  # callers see and override every key
        assert create_model(cfg).gain == 1.5


@pytest.mark.parametrize(
    "config,match",
    [
        (dict(name="vgg"), r"Unknown model name .vgg.; valid: \[.mlp., .serial_cnn.*resnet50"),
        (dict(name="mlp", widht=3), r"Unknown config key\(s\) \['widht'\].*valid keys: .*'width'"),
        (dict(name="mlp", activation="gelu"), r"`activation` must be one of \[.*'relu'.*'tanh'"),
        (dict(name="mlp", init="lecun"), r"`init` must be one of \[.*'orthogonal'"),
        (dict(name="mlp", init="delta_orthogonal"), r"`init` must be one of"),
        (dict(name="mlp", normalization="layernorm"), r"`normalization` must be one of \[.*'smn'"),
        (dict(name="mlp", residual="both"), r"`residual` must be one of \['none', 'pre', 'post'\]"),
        (dict(name="mlp", width=0), r"`width` must be >= 1; got 0"),
        (dict(name="mlp", depth=-2), r"`depth` must be >= 1"),
        (dict(name="serial_cnn", depth=33), r"`depth` must be 6n \+ 2"),
        (dict(name="serial_cnn", normalization="meterez"), r"`normalization` must be one of"),
        (dict(name="serial_cnn", widths=(16, 0, 64)), r"`widths\[1\]` must be >= 1"),
        (dict(name="resnet_cifar", depth=57), r"`depth` must be 6n \+ 2 .*got 57"),
        (dict(name="resnet_cifar", fixup_p=2.0), r"Fixup .* needs normalization='none'"),
        (dict(name="resnet_cifar", widths=(16, 8, 64)), r"`widths` must be non-decreasing"),
        (dict(name="resnet_cifar", activation="shaped_tanh"), r"`activation` must be one of"),
        (dict(name="mlp", activation="selu_depth_aware", selu_epsilon=50.0), r"no positive"),
    ],
)
def test_bad_configs_list_valid_choices(config, match):
    with pytest.raises(ValueError, match=match):
        create_model(config)


def test_bad_inputs_are_rejected():
    model = create_model(TINY["serial_cnn"])
    with pytest.raises(ValueError, match="rank 4"):
        model.init(KEY, jnp.zeros((2, 8)))
    mlp = create_model(dict(name="mlp", width=8, input_layer=False))
    with pytest.raises(ValueError, match="8 input features"):
        mlp.init(KEY, jnp.zeros((2, 5)))


def test_resnet50_parameter_count():
    """torchvision ResNet-50: 25,557,032 parameters; Fixup drops BN (53,120) and adds scalars."""
    x = jnp.zeros((1, 224, 224, 3))
    counts = {}
    for norm, fixup in (("batchnorm", "none"), ("smn", "none"), ("none", "original")):
        model = create_model(dict(name="resnet50", normalization=norm, fixup=fixup))
        v = jax.eval_shape(functools.partial(model.init, train=False), KEY, x)
        counts[norm] = _num_params(v["params"])
    assert abs(counts["batchnorm"] - 25.6e6) < 0.1e6
    assert counts["batchnorm"] == 25_557_032
    assert counts["smn"] == counts["batchnorm"]  # same affine parameters, centred convs
    bn_params = 2 * (
        64
        + sum(
            n * (2 * w + 4 * w) + 4 * w
            for n, w in zip((3, 4, 6, 3), (64, 128, 256, 512), strict=True)
        )
    )
    assert counts["none"] == counts["batchnorm"] - bn_params + 16 * 7 + 2


@pytest.mark.parametrize("fixup", ["original", "ours"])
def test_resnet50_fixup_init_table(fixup):
    """derivations §13 table: conv1/conv2 std, conv3 = 0, projection std, fc = 0 (m = 3)."""
    stage_sizes = (1, 1, 4, 1)
    model = create_model(
        dict(
            name="resnet50",
            normalization="none",
            fixup=fixup,
            stage_sizes=stage_sizes,
            width=16,
            num_classes=7,
        )
    )
    v = _init(model, jnp.zeros((1, 16, 16, 3)))["params"]
    L, m, p = sum(stage_sizes), 3, 2.0
    blk = v["stage3"]  # stacked blocks 2..4 of stage 3: width 64, output 256
    for conv, fan_in, fan_out in (("conv1", 256, 64), ("conv2", 9 * 64, 9 * 64)):
        k = np.asarray(blk[conv]["kernel"])
        if fixup == "original":
            want = math.sqrt(2.0 / fan_out) * L ** (-1 / 4)
        else:
            want = math.sqrt(2.0 / fan_in) * L ** (-p / (2 * m))
        assert abs(k.std() / want - 1) < 4 / math.sqrt(2 * k.size)
    assert not np.any(np.asarray(blk["conv3"]["kernel"]))
    proj = np.asarray(v["stage3_block1"]["proj"]["kernel"])  # 1×1, 128 -> 256
    want = math.sqrt(2.0 / 256) if fixup == "original" else math.sqrt(1.0 / 128)
    assert abs(proj.std() / want - 1) < 4 / math.sqrt(2 * proj.size)
    assert not np.any(np.asarray(v["head"]["dense"]["kernel"]))
    assert not np.any(np.asarray(v["head"]["dense"]["bias"]))


def test_densenet_channels_and_concatenation():
    """Channels 2k + n·k per block, ⌊c/2⌋ at transitions; block(h) = [f(h), h]."""
    k = 12
    model = create_model(dict(name="densenet_bc"))
    x = jnp.zeros((2, 32, 32, 3))
    v = jax.eval_shape(functools.partial(model.init, train=False), KEY, x)
    groups = _abstract_blocks(model, v, x)
    by_name = {g.names[0]: g for g in groups}
    assert len(groups) == 1 + 24 + 2 + 1
    assert by_name["stage1.block1"].inputs.shape[1:] == (2, 32, 32, 2 * k)
    assert by_name["transition1"].inputs.shape[1:] == (2, 32, 32, 2 * k + 8 * k)
    # 1×1 conv with stride 2 and padding 1 (reference code): H -> (H + 2 - 1)//2 + 1: 32, 17, 10
    assert by_name["stage2.block1"].inputs.shape[1:] == (2, 17, 17, 60)
    assert by_name["stage3.block1"].inputs.shape[1:] == (2, 10, 10, (60 + 8 * k) // 2)
    assert by_name["head"].inputs.shape[1:] == (2, 10, 10, 78 + 8 * k)

    small = create_model(dict(name="densenet_bc", growth_rate=3, block_sizes=(1, 1, 1)))
    xs = _input("densenet_bc", batch=2)
    vs = _init(small, xs)

    def first_block(v, x):
        g = small.blocks(v, x, train=False)[1]
        return g.apply(jax.tree.map(lambda a: a[0], g.params), g.inputs[0]), g.inputs[0]

    out, h = jax.jit(first_block, compiler_options=FAST)(vs, xs)
    np.testing.assert_array_equal(out[..., 3:], h)  # carried channels last


def test_conv_mobilenet_layers_and_groups():
    """15 weight layers (stem, 13 dense 3×3 convs, fc); layers 7-11 one scanned group."""
    model = create_model(dict(name="conv_mobilenet"))
    x = jnp.zeros((1, 224, 224, 3))
    v = jax.eval_shape(functools.partial(model.init, train=False), KEY, x)
    kernels = [
        a for p, a in jax.tree_util.tree_leaves_with_path(v["params"]) if p[-1].key == "kernel"
    ]
    assert sum(a.shape[0] if a.ndim == 5 else 1 for a in kernels) == 15
    assert all(a.shape[-4:-2] == (3, 3) for a in kernels if a.ndim >= 4)  # dense 3×3 convs
    groups = _abstract_blocks(model, v, x)
    assert [g.names for g in groups if g.size > 1] == [tuple(f"layer{i}" for i in range(7, 12))]
    assert groups[-1].inputs.shape[1:] == (1, 7, 7, 1024)  # avg-pool 7 at 224×224


@pytest.mark.parametrize(
    "config,match",
    [
        (
            dict(name="resnet50", fixup="new"),
            r"`fixup` must be one of \['none', 'original', 'ours'\]",
        ),
        (dict(name="resnet50", fixup="ours"), r"needs normalization='none'"),
        (
            dict(name="resnet50", fixup="ours", normalization="none", init="orthogonal"),
            r"needs init='kaiming_normal'",
        ),
        (dict(name="resnet50", stage_sizes=(3, 0, 6, 3)), r"`stage_sizes\[1\]` must be >= 1"),
        (dict(name="densenet_bc", growth_rate=0), r"`growth_rate` must be >= 1"),
        (dict(name="densenet_bc", reduction=1.5), r"`reduction` must be in \(0, 1\]"),
        (dict(name="conv_mobilenet", strides=(1, 2)), r"`strides` must have 13 entries"),
        (dict(name="conv_mobilenet", normalization="meterez"), r"`normalization` must be one of"),
    ],
)
def test_bad_configs_imagenet_families(config, match):
    with pytest.raises(ValueError, match=match):
        create_model(config)


def test_float64_under_x64_and_vmapped_inits():
    """Params and outputs are float64 with jax_enable_x64; inits vmap over keys."""
    model = create_model(dict(name="mlp", depth=2, width=4, num_classes=3))
    with jax.enable_x64(True):
        x = jnp.ones((2, 4), jnp.float64)
        v = _init(model, x)
        assert all(a.dtype == jnp.float64 for a in jax.tree.leaves(v))
        assert jax.jit(model.apply, compiler_options=FAST)(v, x).dtype == jnp.float64
    x = jnp.ones((2, 4))
    keys = jax.random.split(KEY, 3)
    vs = jax.jit(jax.vmap(lambda k: model.init(k, x)), compiler_options=FAST)(keys)
    kernels = vs["params"]["hidden"]["dense"]["kernel"]
    assert kernels.shape == (3, 2, 4, 4)
    assert not np.allclose(kernels[0], kernels[1])  # distinct initializations
    assert not np.allclose(kernels[0, 0], kernels[0, 1])  # distinct layers within a scan


def test_densenet_parameter_count_closed_form():
    """DenseNet-BC (k = 12, 3 × 8 bottlenecks, reduction 0.5) against its layer-by-layer count."""
    model = create_model(dict(name="densenet_bc"))
    v = jax.eval_shape(functools.partial(model.init, train=False), KEY, jnp.zeros((1, 32, 32, 3)))
    k, c = 12, 24
    want = 3 * 9 * c  # stem conv, no bias (normalized net)
    for s in range(3):
        for _ in range(8):
            want += 2 * c + c * 4 * k + 2 * 4 * k + 4 * k * 9 * k  # BN, 1×1, BN, 3×3
            c += k
        if s < 2:
            want += 2 * c + c * (c // 2)  # BN, 1×1 transition
            c //= 2
    want += 2 * c + c * 10 + 10  # final BN and linear
    assert _num_params(v["params"]) == want


@pytest.mark.slow
@pytest.mark.parametrize(
    "config,size",
    [
        (dict(name="resnet50"), 224),
        (dict(name="resnet50", normalization="smn"), 224),
        (dict(name="conv_mobilenet"), 224),
        (dict(name="resnet_cifar", depth=56), 32),
        (dict(name="densenet_bc"), 32),
        (dict(name="serial_cnn", depth=32, normalization="batchnorm"), 32),
    ],
    ids=["resnet50", "resnet50-smn", "conv_mobilenet", "resnet56", "densenet", "serial32"],
)
def test_full_size_models_compose(config, size):
    """Full-size models at their native resolution: logits shape and blocks = apply."""
    x = jax.random.normal(jax.random.key(1), (2, size, size, 3))
    model = create_model(config)
    num_classes = default_config(config["name"]).num_classes
    _check_model(config, num_classes, x)
    assert model.num_classes == num_classes


@pytest.mark.parametrize("name", sorted(TINY))
def test_initializer_fields_do_not_change_what_apply_computes(name):
    """Ensembles measure ``_applied_model(model)`` (the init scheme's fields at their class
    defaults), so variants that differ only in their initializer share one measurement
    program: that is sound only if ``apply`` and ``blocks`` never read those fields."""
    from gne_jax.probes.ensemble import _applied_model

    init = "kaiming_normal" if name == "resnet50" else "orthogonal"  # resnet50: Kaiming only
    model = create_model(dict(TINY[name], init=init, head_init="orthogonal"))
    applied = _applied_model(model)
    assert (applied.init_name, applied.head_init) == ("kaiming_normal", "kaiming_normal")
    other = create_model(dict(TINY[name], init="kaiming_normal", head_init="kaiming_normal"))
    assert applied == _applied_model(other) and hash(applied) == hash(_applied_model(other))
    x = _input(name)
    variables = _init(model, x)
    for got, want in zip(_outputs(applied, variables, x), _outputs(model, variables, x),
                         strict=True):
        jax.tree.map(np.testing.assert_array_equal, got, want)
