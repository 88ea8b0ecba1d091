"""The mesh from config, and parameter placement from logical axes (shapes only: released models on big meshes)."""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from mgjax.models.mgm import MGMForCausalLM
from mgjax.parallel import mesh, sharding
from mgjax.recipes import mgm_releases

ONE = {a: 1 for a in mesh.MESH_AXES}


def test_sizes_fill_the_free_axis_and_reject_what_does_not_fit():
    assert mesh.MeshConfig().sizes(8) == {"data": 1, "fsdp": 8, "tensor": 1, "expert": 1}
    assert mesh.MeshConfig(data=-1, fsdp=2, tensor=2).sizes(8) == {"data": 2, "fsdp": 2, "tensor": 2, "expert": 1}
    for bad, devices in [
        (mesh.MeshConfig(data=-1, fsdp=-1), 8),
        (mesh.MeshConfig(fsdp=3), 8),
        (mesh.MeshConfig(fsdp=2, tensor=2), 8),
        (mesh.MeshConfig(tensor=0), 8),
    ]:
        with pytest.raises(ValueError, match="mesh"):
            bad.sizes(devices)


def test_sizes_across_slices_multiply_the_sizes_within():
    c = mesh.MeshConfig(fsdp=-1, tensor=2, dcn_data=4)
    assert c.within(16) == {"data": 1, "fsdp": 8, "tensor": 2, "expert": 1}
    assert c.sizes(64) == {"data": 4, "fsdp": 8, "tensor": 2, "expert": 1}
    with pytest.raises(ValueError, match="do not split"):
        c.sizes(30)


def test_make_mesh_on_this_host():
    m = mesh.make_mesh(mesh.MeshConfig())
    assert m.axis_names == mesh.MESH_AXES and m.devices.size == len(m.devices.reshape(-1))


@pytest.mark.parametrize(
    "axes, shape, sizes, want",
    [
        (("layers", "embed", "mlp"), (32, 4096, 11008), dict(fsdp=8), P(None, "fsdp", None)),
        (("layers", "embed", "mlp"), (32, 4096, 11008), dict(fsdp=8, tensor=2), P(None, "fsdp", "tensor")),
        (("vocab", "embed"), (32000, 4096), dict(fsdp=4, tensor=2), P("tensor", "fsdp")),
        # 24 does not split 16 ways: ZeRO-3 splits the largest dimension that does instead
        (("layers", "embed", "mlp"), (2, 24, 4096), dict(fsdp=16), P(None, None, "fsdp")),
        (("positions", "conv_kernel"), (577, 1024), dict(fsdp=8), P(None, "fsdp")),  # no rule: ZeRO-3 fills
        (("layers", "norm"), (32, 4096), dict(fsdp=8), P(None, None)),  # under the floor per layer: whole
        (("norm",), (4096,), dict(fsdp=4), P(None)),
        (("mlp", "conv_in"), (80, 820), dict(fsdp=8), P("fsdp", None)),  # 65,600 elements: at the floor, split
        (("experts", "embed", "mlp"), (8, 4096, 14336), dict(fsdp=8, expert=4), P("expert", "fsdp", None)),
        (("vocab", "embed"), (32000, 4096), dict(fsdp=8, expert=4), P(None, ("fsdp", "expert"))),  # expert acts as fsdp
        (
            ("conv_out", "conv_in", "conv_kernel", "conv_kernel"),
            (1536, 1, 7, 7),
            dict(fsdp=8),
            P("fsdp", None, None, None),  # the rules split conv_out, whatever the size
        ),
        (("batch", None), (64, 2048), dict(data=2, fsdp=4), P(("data", "fsdp"), None)),
        (("batch", None), (64, 2048), dict(fsdp=4), P("fsdp", None)),  # a size-1 axis is left out
        (("embed", "embed"), (64, 64), dict(fsdp=8), P("fsdp", None)),  # a mesh axis splits one dimension only
    ],
)
def test_spec(axes, shape, sizes, want):
    assert mesh.spec(axes, shape, {**ONE, **sizes}) == want


@pytest.mark.parametrize(
    "name, sizes",
    [
        ("MGM-7B", dict(fsdp=8)),
        ("MGM-2B", dict(fsdp=8, tensor=2)),
        ("MGM-34B", dict(fsdp=32)),
        ("MGM-34B-HD", dict(data=4, fsdp=32)),
        ("MGM-8x7B", dict(fsdp=8, expert=4)),
    ],
)
def test_released_models_are_fully_sharded_under_fsdp(name, sizes):
    model = nnx.eval_shape(lambda: MGMForCausalLM(mgm_releases.config(name), rngs=nnx.Rngs(0)))
    placed = mesh.placement(model, {**ONE, **sizes})
    shards = sizes.get("fsdp", 1) * sizes.get("tensor", 1) * sizes.get("expert", 1)  # data replicates them
    assert placed.sharded_fraction > 0.999
    # ZeRO-3: hardly anything whole (arrays under ZERO3_FLOOR: MGM-2B on fsdp 8 x tensor 2 holds 0.24% above 1/16)
    assert placed.per_device_bytes <= 1.005 * placed.total_bytes / shards
    axes = {
        ".".join(map(str, k)): v.get_metadata()["out_sharding"]
        for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
    }
    # what stays whole is per-channel vectors (norms, biases, layer scales), stacked or not
    assert all(len([a for a in axes[n] if a != "layers"]) == 1 for n in placed.replicated)


def test_activation_constraints_follow_the_rules_and_vanish_without_a_mesh():
    axes = ("act_batch", "act_len", "act_heads")
    x = jnp.zeros((8, 16, 4, 32))
    assert sharding.constrain(x, axes) is x  # no mesh: nothing to constrain
    m = jax.sharding.AbstractMesh((2, 2, 2, 1), mesh.MESH_AXES)

    def spec(shape):
        with jax.sharding.use_abstract_mesh(m):
            jaxpr = jax.make_jaxpr(lambda x: sharding.constrain(x, axes))(jnp.zeros(shape))
        return jaxpr.eqns[0].params["sharding"].spec if jaxpr.eqns else None

    u = P.UNCONSTRAINED
    assert spec((8, 16, 4, 32)) == P(("data", "fsdp"), u, "tensor", u)
    assert spec((8, 16, 3, 32)) == P(("data", "fsdp"), u, u, u)  # 3 heads do not split in 2: left to XLA
    assert spec((2, 16, 3, 32)) is None  # nor 2 rows in 4: nothing constrained
