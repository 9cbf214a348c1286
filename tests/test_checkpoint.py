"""save_quantized / load_quantized: bit-exact round trips (Linen, FrozenDict, nnx.State), restore onto
8 fake CPU devices, equal model outputs, atomic saves under raise and SIGKILL, overwrite rules and
clear errors for corrupt or mismatching checkpoints."""

import dataclasses
import json
import os
import pathlib
import shutil
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from flax.core import freeze
from hypothesis import given, settings
from hypothesis import strategies as st

import jint8
from reference import require_module
from jint8 import checkpoint
from jint8.checkpoint import metadata as checkpoint_metadata
from jint8.checkpoint import atomic as checkpoint_atomic
from jint8.checkpoint import is_jint8_checkpoint, load_metadata, load_quantized, save_quantized
from jint8.errors import (
    CheckpointError,
    CheckpointExistsError,
    CheckpointFormatError,
    CheckpointMismatchError,
    CheckpointNotFoundError,
    CheckpointVersionError,
    InvalidConfigError,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = jint8.Int8Config(threshold=4.0, min_size=16, capacity_overrides={"out": 4}, skip_modules=("skipped",))


@dataclasses.dataclass(frozen=True)
class TinyConfig:
    vocab_size: int = 11
    hidden: tuple = (32, 16)
    dtype: object = jnp.bfloat16


def random_params(seed: int = 0) -> dict:
    """A Linen-style tree: 2-D and 3-D kernels (in_ndim 1 and 2), a skipped kernel, bf16 and f32 leaves."""
    keys = jax.random.split(jax.random.key(seed), 5)
    params = {
        "hidden": {"kernel": jax.random.normal(keys[0], (24, 32)), "bias": jnp.arange(32, dtype=jnp.bfloat16)},
        "attn": {"kernel": jax.random.normal(keys[1], (4, 8, 32))},  # [heads, head_dim, features]
        "out": {"kernel": jax.random.normal(keys[2], (32, 16)).astype(jnp.bfloat16)},
        "skipped": {"kernel": jax.random.normal(keys[3], (16, 16))},
        "embed": {"embedding": jax.random.normal(keys[4], (11, 24), jnp.bfloat16)},
    }
    return jint8.quantize_params(params, CONFIG)


def assert_bit_identical(restored, expected) -> None:
    """Same tree structure (Int8Weight static fields are part of it) and byte-equal leaves of equal dtype."""
    assert jax.tree.structure(restored) == jax.tree.structure(expected)
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(expected)):
        got, want = np.asarray(got), np.asarray(want)
        assert (got.dtype, got.shape) == (want.dtype, want.shape)
        assert got.tobytes() == want.tobytes()


def run_script(source: str, *args, devices: int = 1) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")  # fmt: skip
    code = textwrap.dedent(source)
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=240)  # fmt: skip


# ----------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("container", [dict, freeze], ids=["dict", "FrozenDict"])
def test_linen_round_trip_is_bit_exact_and_keeps_static_fields(tmp_path, container):
    params = container(random_params())
    save_quantized(tmp_path / "ckpt", params, quant_config=CONFIG, model_config={"layers": 2})
    restored, info = load_quantized(tmp_path / "ckpt")
    assert type(restored) is type(params)
    assert_bit_identical(restored, params)
    attn, out = restored["attn"]["kernel"], restored["out"]["kernel"]
    assert isinstance(attn, jint8.Int8Weight) and attn.in_ndim == 2 and attn.threshold == 4.0
    assert out.outlier_capacity == 4 and out.qvalue.dtype == jnp.int8 and out.scale.dtype == jnp.float32
    assert restored["out"]["kernel"].qvalue.dtype == jnp.int8
    assert restored["skipped"]["kernel"].dtype == jnp.float32
    assert restored["embed"]["embedding"].dtype == jnp.bfloat16
    assert info.quant_config == CONFIG and info.model_config == {"layers": 2}
    kind = "dict" if container is dict else "frozen_dict"
    assert (info.format_version, info.jint8_version, info.tree_kind) == (2, jint8.__version__, kind)


class TinyNNX(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.layers = nnx.List([jint8.Int8Linear(16, 32, rngs=rngs), jint8.Int8Linear(32, 8, rngs=rngs)])
        self.norm = nnx.BatchNorm(8, rngs=rngs)

    def __call__(self, x):
        for layer in self.layers:
            x = jax.nn.gelu(layer(x))
        return self.norm(x, use_running_average=True)


def test_nnx_state_round_trip_is_bit_exact_and_model_outputs_equal(tmp_path):
    model = TinyNNX(nnx.Rngs(0))
    state = jint8.quantize_params(nnx.state(model), CONFIG)
    nnx.update(model, state)
    x = 3.0 * jax.random.normal(jax.random.key(1), (5, 16))
    forward = nnx.jit(lambda m, x: m(x))  # one compile instead of one per eager op
    before = forward(model, x)
    save_quantized(tmp_path / "nnx", state, quant_config=CONFIG)
    restored, info = load_quantized(tmp_path / "nnx")
    assert isinstance(restored, nnx.State) and info.tree_kind == "nnx_state"
    assert type(restored["layers"][0]["kernel"]) is nnx.Param
    assert type(restored["norm"]["mean"]) is nnx.BatchStat
    assert_bit_identical(restored, state)
    fresh = TinyNNX(nnx.Rngs(7))
    nnx.update(fresh, restored)
    np.testing.assert_array_equal(np.asarray(forward(fresh, x)), np.asarray(before))


class TinyLinen(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = jax.nn.gelu(jint8.Int8Dense(32, name="hidden")(x))
        return jint8.Int8Dense(16, name="out", param_dtype=jnp.bfloat16)(x)


def test_linen_model_outputs_equal_before_save_and_after_load(tmp_path):
    x = jax.random.normal(jax.random.key(2), (6, 24)).at[:, 3].set(9.0)  # one outlier column above threshold
    float_params = TinyLinen().init(jax.random.key(0), x)["params"]
    params = jint8.quantize_params(float_params, CONFIG)
    apply = jax.jit(TinyLinen().apply)  # one compile instead of one per eager op
    before = apply({"params": params}, x)
    save_quantized(tmp_path / "model", params, quant_config=CONFIG)
    restored, _ = load_quantized(tmp_path / "model")
    after = apply({"params": restored}, x)
    assert isinstance(restored["hidden"]["kernel"], jint8.Int8Weight)
    np.testing.assert_array_equal(np.asarray(after), np.asarray(before))


@settings(max_examples=10, deadline=None)
@given(
    shape=st.lists(st.integers(1, 9), min_size=2, max_size=4),
    in_ndim=st.integers(1, 3),
    dtype=st.sampled_from(["float32", "bfloat16", "float16", "int32", "uint8", "bool"]),
    capacity=st.integers(0, 9),
    threshold=st.floats(0.0, 100.0),
    seed=st.integers(0, 2**31),
)
def test_round_trip_is_bit_exact_for_any_shape_and_dtype(
    tmp_path_factory, shape, in_ndim, dtype, capacity, threshold, seed
):
    # Built in numpy (any bit pattern, NaNs included in the float leaf): no XLA compile per example.
    rng = np.random.default_rng(seed)
    in_ndim = min(in_ndim, len(shape) - 1)
    qvalue = rng.integers(-127, 128, shape, dtype=np.int8)  # stored K-major: [*out, *in]
    scale = rng.random(shape[: len(shape) - in_ndim], dtype=np.float32)
    other = rng.integers(0, 256, shape, dtype=np.uint8).view(np.uint8).astype(jnp.dtype(dtype))
    config = jint8.Int8Config(outlier_capacity=capacity, threshold=threshold)
    weight = jint8.Int8Weight(jnp.asarray(qvalue), jnp.asarray(scale), in_ndim, threshold, capacity)
    params = {"layer": {"kernel": weight, "other": jnp.asarray(other)}, "0": {"x": jnp.asarray(scale)}}
    path = tmp_path_factory.mktemp("prop") / "ckpt"
    save_quantized(path, params, quant_config=config)
    assert_bit_identical(load_quantized(path)[0], params)


def test_model_config_dataclass_is_stored_with_its_class_name(tmp_path):
    save_quantized(tmp_path / "c", random_params(), quant_config=CONFIG, model_config=TinyConfig())
    info = load_metadata(tmp_path / "c")
    assert info.model_config == {"vocab_size": 11, "hidden": [32, 16], "dtype": "bfloat16"}
    assert info.model_config_class == f"{__name__}.TinyConfig"


def test_on_disk_size_is_about_the_int8_bytes(tmp_path):
    w = jax.random.normal(jax.random.key(0), (512, 256))
    params = jint8.quantize_params({"layer": {"kernel": w}}, CONFIG)
    save_quantized(tmp_path / "s", params, quant_config=CONFIG)
    on_disk = sum(f.stat().st_size for f in (tmp_path / "s").rglob("*") if f.is_file())
    assert on_disk < 512 * 256 * 1.1 + 16_384  # int8 values, scales, and a few KiB of metadata


# ----------------------------------------------------------------------------- sharded restore

RESHARD_SCRIPT = """
import sys
import jax, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from jint8 import Int8Weight
from jint8.checkpoint import load_quantized
from jint8.errors import CheckpointMismatchError

assert jax.device_count() == 8
directory, expected = sys.argv[1], np.load(sys.argv[2])  # byte views: npz has no bfloat16
mesh = jax.make_mesh((2, 4), ("data", "model"))
shardings = {
    "hidden": {"kernel": P("data", "model"), "bias": P("model")},
    "attn": {"kernel": Int8Weight(NamedSharding(mesh, P(None, None, "model")), NamedSharding(mesh, P("model")))},
    "out": {"kernel": P("model", None)},
    "skipped": {"kernel": jax.ShapeDtypeStruct((16, 16), np.float32, sharding=NamedSharding(mesh, P("data")))},
    "embed": {"embedding": None},
}
params, _ = load_quantized(directory, mesh=mesh, shardings=shardings)
got = {jax.tree_util.keystr(path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(params)}
want_specs = {
    # One spec at an Int8Weight is the float kernel's [in, out]; qvalue is stored [out, in].
    "['hidden']['kernel'].qvalue": P("model", "data"), "['hidden']['kernel'].scale": P("model"),
    "['hidden']['bias']": P("model"), "['attn']['kernel'].qvalue": P(None, None, "model"),
    "['attn']['kernel'].scale": P("model"), "['out']['kernel'].qvalue": P(None, "model"),
    "['out']['kernel'].scale": P(), "['skipped']['kernel']": P("data"), "['embed']['embedding']": P(),
}
for name, leaf in got.items():
    assert leaf.sharding.mesh.shape == mesh.shape, name
    assert leaf.sharding.spec == want_specs[name], (name, leaf.sharding.spec)
    assert np.asarray(leaf).tobytes() == expected[name].tobytes(), name
    assert str(leaf.dtype) == sys.argv[3].split(",")[list(want_specs).index(name)], name
assert len(got["['hidden']['kernel'].qvalue"].addressable_shards) == 8
assert got["['hidden']['kernel'].qvalue"].addressable_shards[0].data.shape == (8, 12)

# A callable rule: shard every kernel's first (input) axis over "model"; it sees int8 kernels'
# float shape [in, out], and their K-major qvalue [out, in] gets "model" on its second axis.
by_rule, _ = load_quantized(directory, shardings=lambda path, a: NamedSharding(mesh, P("model") if a.shape[0] % 4 == 0 else P()))
assert by_rule["hidden"]["kernel"].qvalue.sharding.spec == P(None, "model")
assert by_rule["embed"]["embedding"].sharding.spec == P()
for a, b in zip(jax.tree.leaves(by_rule), jax.tree.leaves(params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

# mesh alone: everything replicated on it.
replicated, _ = load_quantized(directory, mesh=mesh)
assert all(leaf.sharding.is_fully_replicated and len(leaf.sharding.device_set) == 8 for leaf in jax.tree.leaves(replicated))

# A spec that cannot split the saved shape is refused before anything is read.
bad = dict(shardings, embed={"embedding": P("model")})  # 11 rows over 4 devices
try:
    load_quantized(directory, mesh=mesh, shardings=bad)
except CheckpointMismatchError as e:
    assert "embed/embedding" in str(e) and directory in str(e), e
else:
    raise AssertionError("uneven split accepted")
print("RESHARD OK")
"""


def test_restore_onto_8_devices_places_each_array_and_keeps_values(tmp_path):
    params = random_params()
    save_quantized(tmp_path / "ckpt", params, quant_config=CONFIG)
    leaves = {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(params)}
    np.savez(tmp_path / "expected.npz", **{name: x.view(np.uint8) for name, x in leaves.items()})
    order = ["['hidden']['kernel'].qvalue", "['hidden']['kernel'].scale", "['hidden']['bias']",
             "['attn']['kernel'].qvalue", "['attn']['kernel'].scale", "['out']['kernel'].qvalue",
             "['out']['kernel'].scale", "['skipped']['kernel']", "['embed']['embedding']"]  # fmt: skip
    dtypes = ",".join(str(leaves[name].dtype) for name in order)
    result = run_script(RESHARD_SCRIPT, tmp_path / "ckpt", tmp_path / "expected.npz", dtypes, devices=8)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "RESHARD OK" in result.stdout


# ----------------------------------------------------------------------------- interrupted saves


def failing_finalize(seen: list):
    """A stand-in for Orbax's finalize step (all items written, not yet committed) that raises."""

    def finalize(self, directory):
        seen.extend(p for p in pathlib.Path(directory).rglob("*") if p.is_file() and "ocdbt.process_0" in p.parts)
        raise RuntimeError("disk unplugged mid-save")

    return finalize


def test_save_raising_mid_way_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    old, new = random_params(0), random_params(1)
    save_quantized(tmp_path / "ckpt", old, quant_config=CONFIG)
    written: list = []
    monkeypatch.setattr(ocp.CompositeCheckpointHandler, "finalize", failing_finalize(written))
    with pytest.raises(CheckpointError, match="disk unplugged"):
        save_quantized(tmp_path / "ckpt", new, quant_config=CONFIG, overwrite=True)
    assert written, "the patched step ran before any array was written"
    monkeypatch.undo()
    assert_bit_identical(load_quantized(tmp_path / "ckpt")[0], old)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # partial staging data removed


def test_fresh_save_raising_mid_way_leaves_no_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setattr(ocp.CompositeCheckpointHandler, "finalize", failing_finalize([]))
    with pytest.raises(CheckpointError):
        save_quantized(tmp_path / "ckpt", random_params(), quant_config=CONFIG)
    monkeypatch.undo()
    assert not is_jint8_checkpoint(tmp_path / "ckpt")
    with pytest.raises(CheckpointNotFoundError, match="no checkpoint directory"):
        load_quantized(tmp_path / "ckpt")
    save_quantized(tmp_path / "ckpt", random_params(), quant_config=CONFIG)  # the path is still usable


KILLED_SAVE_SCRIPT = """
import os, signal, sys
import orbax.checkpoint as ocp
sys.path.insert(0, os.path.join(os.environ["PYTHONPATH"], "tests"))
from test_checkpoint import CONFIG, random_params
from jint8.checkpoint import save_quantized

def killed(self, directory):  # SIGKILL: no exception handler, no cleanup runs
    os.kill(os.getpid(), signal.SIGKILL)

ocp.CompositeCheckpointHandler.finalize = killed
save_quantized(sys.argv[1], random_params(1), quant_config=CONFIG, overwrite=True)
print("NOT KILLED")
"""


def test_killed_save_keeps_the_previous_checkpoint_loadable(tmp_path):
    old = random_params(0)
    save_quantized(tmp_path / "ckpt", old, quant_config=CONFIG)
    result = run_script(KILLED_SAVE_SCRIPT, tmp_path / "ckpt")
    assert result.returncode == -9, result.stdout + result.stderr
    assert any(".jint8-staging-" in p.name for p in tmp_path.iterdir())  # the killed save's leftovers
    assert is_jint8_checkpoint(tmp_path / "ckpt")
    assert_bit_identical(load_quantized(tmp_path / "ckpt")[0], old)
    live = tmp_path / f".other.jint8-staging-{checkpoint_atomic._host_tag()}-{os.getpid()}-0000abcd"
    live.mkdir()  # a save still running (this process) keeps its staging directory
    save_quantized(tmp_path / "ckpt", random_params(1), quant_config=CONFIG, overwrite=True)
    assert_bit_identical(load_quantized(tmp_path / "ckpt")[0], random_params(1))
    # the next save to the same parent removed the dead writer's staging directory
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, "ckpt"])


# ----------------------------------------------------------------------------- overwrite rules


def test_existing_checkpoint_is_kept_unless_overwrite(tmp_path):
    old, new = random_params(0), random_params(1)
    save_quantized(tmp_path / "ckpt", old, quant_config=CONFIG)
    with pytest.raises(CheckpointExistsError, match="overwrite=True"):
        save_quantized(tmp_path / "ckpt", new, quant_config=CONFIG)
    assert_bit_identical(load_quantized(tmp_path / "ckpt")[0], old)
    save_quantized(tmp_path / "ckpt", new, quant_config=CONFIG, overwrite=True)
    assert_bit_identical(load_quantized(tmp_path / "ckpt")[0], new)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_overwrite_without_atomic_exchange_falls_back_to_two_renames(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint_atomic, "_exchange", lambda a, b: False)
    save_quantized(tmp_path / "ckpt", random_params(0), quant_config=CONFIG)
    save_quantized(tmp_path / "ckpt", random_params(1), quant_config=CONFIG, overwrite=True)
    assert_bit_identical(load_quantized(tmp_path / "ckpt")[0], random_params(1))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_overwrite_never_deletes_a_directory_that_is_not_a_checkpoint(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    with pytest.raises(CheckpointExistsError, match="not a jint8 checkpoint"):
        save_quantized(tmp_path / "model", random_params(), quant_config=CONFIG, overwrite=True)
    assert (tmp_path / "model" / "config.json").read_text() == "{}"


def test_save_rejects_bad_arguments(tmp_path):
    with pytest.raises(InvalidConfigError, match="quant_config"):
        save_quantized(tmp_path / "a", random_params(), quant_config={"threshold": 6.0})
    with pytest.raises(jint8.errors.CheckpointError, match="list"):
        save_quantized(tmp_path / "a", [jnp.ones(3)], quant_config=CONFIG)
    with pytest.raises(InvalidConfigError, match="model_config"):
        save_quantized(tmp_path / "a", random_params(), quant_config=CONFIG, model_config=object())
    assert not (tmp_path / "a").exists()


# ----------------------------------------------------------------------------- corrupt checkpoints


def rewrite_metadata(directory, edit) -> None:
    path = directory / "metadata" / "metadata"
    raw = json.loads(path.read_text())
    edit(raw)
    path.write_text(json.dumps(raw))


CORRUPTIONS = {
    "newer format version": (
        lambda d: rewrite_metadata(d, lambda m: m.update(format_version=99)),
        CheckpointVersionError,
        "format_version=99",
    ),
    "format version 1 (int8 kernels stored [in, out])": (
        lambda d: rewrite_metadata(d, lambda m: m.update(format_version=1)),
        CheckpointVersionError,
        "quantize the original checkpoint again",
    ),
    "truncated JSON": (
        lambda d: (d / "metadata" / "metadata").write_text('{"format": "jint8-qua'),
        CheckpointFormatError,
        "not valid JSON",
    ),
    "not a jint8 format": (
        lambda d: rewrite_metadata(d, lambda m: m.update(format="other")),
        CheckpointFormatError,
        "does not describe",
    ),
    "leaf record without in_ndim": (
        lambda d: rewrite_metadata(d, lambda m: next(r for r in m["leaves"] if r["kind"] == "int8_weight").pop("in_ndim")),
        CheckpointFormatError,
        "in_ndim",
    ),
    "recorded shape differs from the stored array": (
        lambda d: rewrite_metadata(d, lambda m: m["leaves"][0].update(shape=[99, 1])),
        CheckpointFormatError,
        "shapes differ",
    ),
    "array missing from the arrays item": (
        lambda d: rewrite_metadata(d, lambda m: m["leaves"].append({**m["leaves"][0], "path": ["ghost"]})),
        CheckpointFormatError,
        r"2 arrays missing \['ghost/qvalue', 'ghost/scale'\]",
    ),
    "metadata item deleted": (
        lambda d: shutil.rmtree(d / "metadata"),
        CheckpointNotFoundError,
        "no 'metadata' item",
    ),
    "arrays item deleted": (
        lambda d: shutil.rmtree(d / "arrays"),
        CheckpointNotFoundError,
        "no 'arrays' item",
    ),
}


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_corrupt_checkpoint_raises_a_clear_error_naming_the_directory(tmp_path, corruption):
    corrupt, error, message = CORRUPTIONS[corruption]
    directory = tmp_path / "ckpt"
    save_quantized(directory, random_params(), quant_config=CONFIG)
    corrupt(directory)
    with pytest.raises(error, match=message) as info:
        load_quantized(directory)
    assert str(directory) in str(info.value)


def test_corrupt_checkpoint_can_be_overwritten(tmp_path):
    save_quantized(tmp_path / "ckpt", random_params(0), quant_config=CONFIG)
    (tmp_path / "ckpt" / "metadata" / "metadata").write_text("garbage")
    save_quantized(tmp_path / "ckpt", random_params(1), quant_config=CONFIG, overwrite=True)
    assert_bit_identical(load_quantized(tmp_path / "ckpt")[0], random_params(1))


def test_is_jint8_checkpoint_recognises_only_finalized_jint8_checkpoints(tmp_path):
    save_quantized(tmp_path / "ckpt", random_params(), quant_config=CONFIG)
    (tmp_path / "empty").mkdir()
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "model.safetensors").write_bytes(b"\0" * 8)
    assert is_jint8_checkpoint(tmp_path / "ckpt")
    assert not is_jint8_checkpoint(tmp_path / "empty")
    assert not is_jint8_checkpoint(tmp_path / "model")
    assert not is_jint8_checkpoint(tmp_path / "missing")
    rewrite_metadata(tmp_path / "ckpt", lambda m: m.update(format_version=99))
    assert is_jint8_checkpoint(tmp_path / "ckpt")  # ours, but newer: load_quantized says so clearly


# ----------------------------------------------------------------------------- tree mismatch


def test_shardings_tree_mismatch_names_the_differing_paths(tmp_path):
    save_quantized(tmp_path / "ckpt", random_params(), quant_config=CONFIG)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    full = jax.tree.map(lambda _: device, random_params())
    missing = {k: v for k, v in full.items() if k != "out"}
    with pytest.raises(CheckpointMismatchError, match=r"1 saved leaves missing from shardings \['out/kernel'\]"):
        load_quantized(tmp_path / "ckpt", shardings=missing)
    extra = {**full, "lm_head": {"kernel": device}}
    with pytest.raises(CheckpointMismatchError, match=r"not in the checkpoint \['lm_head/kernel'\]"):
        load_quantized(tmp_path / "ckpt", shardings=extra)
    wrong_shape = {**full, "skipped": {"kernel": jax.ShapeDtypeStruct((16, 17), jnp.float32, sharding=device)}}
    with pytest.raises(CheckpointMismatchError, match=r"skipped/kernel: saved shape \(16, 16\) != target shape"):
        load_quantized(tmp_path / "ckpt", shardings=wrong_shape)
    mesh = jax.make_mesh((1,), ("model",))
    too_many_axes = {**full, "out": {"kernel": jax.sharding.PartitionSpec(None, None, "model")}}
    with pytest.raises(CheckpointMismatchError, match="out/kernel/qvalue"):
        load_quantized(tmp_path / "ckpt", mesh=mesh, shardings=too_many_axes)
    # Int8Weight-of-shardings trees (what jax.tree.map over params gives) and one Sharding for all restore fine.
    assert_bit_identical(load_quantized(tmp_path / "ckpt", shardings=full)[0], random_params())
    assert_bit_identical(load_quantized(tmp_path / "ckpt", shardings=device)[0], random_params())


# ----------------------------------------------------------------------------- quantize_checkpoint


def test_quantize_checkpoint_saves_what_from_pretrained_returns_with_its_config(tmp_path, monkeypatch):
    calls = []

    class FakeModel:
        config = TinyConfig()

    def fake_from_pretrained(path, *, quantization=None, progress=None):
        calls.append((path, quantization, progress))
        return FakeModel(), random_params()

    monkeypatch.setattr(jint8, "from_pretrained", fake_from_pretrained, raising=False)
    out = checkpoint.quantize_checkpoint("src-dir", tmp_path / "q", quant_config=CONFIG, progress=False)
    assert calls == [("src-dir", CONFIG, False)]
    restored, info = load_quantized(out)
    assert_bit_identical(restored, random_params())
    assert info.model_config_class.endswith("TinyConfig") and info.model_config["vocab_size"] == 11
    with pytest.raises(CheckpointExistsError):  # refused before the (expensive) load
        checkpoint.quantize_checkpoint("src-dir", out, quant_config=CONFIG)
    assert len(calls) == 1


@pytest.mark.skipif(not hasattr(jint8, "from_pretrained"), reason="jint8.from_pretrained not built yet")
def test_quantize_checkpoint_of_a_real_llama_gives_identical_logits(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from models.tiny_checkpoints import random_ids, save_checkpoint

    save_checkpoint("llama", tmp_path / "src")
    config = jint8.Int8Config(min_size=16)
    model, params = jint8.from_pretrained(tmp_path / "src", quantization=config, progress=False)
    checkpoint.quantize_checkpoint(tmp_path / "src", tmp_path / "int8", quant_config=config, progress=False)
    restored, info = load_quantized(tmp_path / "int8")
    assert_bit_identical(restored, params)
    assert info.model_config_class.endswith(type(model.config).__qualname__)
    assert info.model_config == json.loads(json.dumps(checkpoint_metadata._config_dict(model.config, "")[0]))
    ids = jnp.asarray(random_ids(2, 7))
    apply = jax.jit(model.apply)
    before, _ = apply({"params": params}, ids)
    after, _ = apply({"params": restored}, ids)
    np.testing.assert_array_equal(np.asarray(after), np.asarray(before))


def test_from_pretrained_recognises_a_jint8_checkpoint(tmp_path):
    require_module("torch")
    from models.tiny_checkpoints import random_ids, save_checkpoint

    save_checkpoint("qwen2", tmp_path / "src")
    config = jint8.Int8Config(min_size=16)
    model, params = jint8.from_pretrained(tmp_path / "src", quantization=config, progress=False)
    checkpoint.quantize_checkpoint(tmp_path / "src", tmp_path / "int8", quant_config=config, progress=False)
    again_model, again = jint8.from_pretrained(tmp_path / "int8", progress=False)
    assert again_model.config == model.config
    assert_bit_identical(again, params)
    ids = jnp.asarray(random_ids(2, 5))
    np.testing.assert_array_equal(np.asarray(again_model.apply({"params": again}, ids)[0]),
                                  np.asarray(model.apply({"params": params}, ids)[0]))
    with pytest.raises(jint8.errors.InvalidConfigError, match="re-quantized"):
        jint8.from_pretrained(tmp_path / "int8", quantization=jint8.Int8Config(threshold=3.0), progress=False)


# ----------------------------------------------------------------------------- checksums


@pytest.mark.parametrize("make", [
    lambda: np.arange(-60, 60, dtype=np.int8).reshape(8, 15),
    lambda: jnp.asarray(np.random.default_rng(0).standard_normal((33, 7)), jnp.bfloat16),
    lambda: jnp.asarray(np.random.default_rng(1).standard_normal((5, 4, 3)).astype(np.float32)).T,  # not C order
    lambda: jnp.float32(3.5),
    lambda: np.zeros((0, 4), np.float16),
])
def test_array_checksum_is_crc32c_of_the_c_order_bytes(make):
    import crc32c

    from jint8.checkpoint.integrity import array_checksum

    array = make()
    assert array_checksum(array) == crc32c.crc32c(np.ascontiguousarray(np.asarray(array)).tobytes())


def test_parallel_verification_names_exactly_the_damaged_arrays(tmp_path):
    """Checked on a thread pool: the same verdict, array by array, as one thread's."""
    import types

    from jint8.checkpoint.integrity import array_checksum, verify_checksums

    rng = np.random.default_rng(2)
    restored = {f"layer_{i}": {"kernel": jnp.asarray(rng.standard_normal((64, 48)).astype(np.float32))}
                for i in range(12)}
    damaged = {3, 7, 8}
    leaves = [types.SimpleNamespace(storage_path=(name, "kernel"),
                                    checksums=(("", array_checksum(tree["kernel"]) ^ (i in damaged)),))
              for i, (name, tree) in enumerate(restored.items())]
    with pytest.raises(jint8.errors.CheckpointIntegrityError, match="3 arrays do not match") as info:
        verify_checksums(tmp_path, leaves, restored)
    assert "['layer_3/kernel', 'layer_7/kernel', 'layer_8/kernel']" in str(info.value)
    verify_checksums(tmp_path, [leaf for i, leaf in enumerate(leaves) if i not in damaged], restored)
