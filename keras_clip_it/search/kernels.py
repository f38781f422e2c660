"""The jitted products of the scan: screened scores of one block, on one device or sharded over a mesh."""

import functools

import jax
import jax.numpy as jnp

# Anchors per group maximum: the host first compares block / GROUP maxima with the running k-th value.
GROUP = 8


def to_device(array, mesh):
    """Places a host array on the device(s). On CPU an aligned array (`aligned_zeros`) is not copied:
    the device array is that memory, so a caller changes only what no computation reads (masked slots).
    `device_put` is faster than `jnp.asarray` for bfloat16."""
    if mesh is None:
        return jax.device_put(array)
    spec = jax.sharding.PartitionSpec(mesh.axis_names[0])
    return jax.device_put(array, jax.sharding.NamedSharding(mesh, spec))


def shares_memory(device_array, host_array):
    """Whether a single-device array is `host_array`'s memory (a zero-copy placement on CPU)."""
    if len(device_array.devices()) != 1:
        return False
    return device_array.unsafe_buffer_pointer() == host_array.ctypes.data


def screen_scores(queries, anchors, scales):
    """Screened scores (Q, block) of bfloat16 queries against one block (bfloat16 or int8 anchors)."""
    scores = jax.lax.dot_general(
        queries, anchors.astype(jnp.bfloat16), (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32
    )
    return scores if scales is None else scores * scales[None, :]


@jax.jit
def block_scores(queries, anchors, scales, bias):
    """Screened scores of one block and their maxima per group of GROUP anchors (fused, nearly free).

    `bias` is 0 for live anchors and -inf for removed ones and padding, which no threshold passes.
    """
    scores = screen_scores(queries, anchors, scales) + bias[None, :]
    return scores, scores.reshape(scores.shape[0], -1, GROUP).max(axis=2)


@jax.jit
def plain_block_scores(queries, anchors):
    """`block_scores` of a block whose scales are 1 and whose bias is 0: the product's output is the
    result, without a pass that writes the (Q, block) scores again."""
    scores = screen_scores(queries, anchors, None)
    return scores, scores.reshape(scores.shape[0], -1, GROUP).max(axis=2)


@functools.partial(jax.jit, static_argnames=("mesh", "m"))
def sharded_block_topk(queries, anchors, scales, bias, valid, mesh, m):
    """Each device scores its slice of the block and keeps its own top-m; returns all (Q, devices * m).

    On accelerators this keeps the selection on the device that holds the anchors: only devices x m
    candidates per query cross the interconnect, never the block's scores.
    """
    axis = mesh.axis_names[0]
    spec = jax.sharding.PartitionSpec
    local_size = anchors.shape[0] // mesh.devices.size

    def local(queries, anchors, scales, bias):
        first = jax.lax.axis_index(axis) * local_size
        scores = screen_scores(queries, anchors, scales) + bias[None, :]
        rows = first + jnp.arange(local_size, dtype=jnp.int32)
        values, positions = jax.lax.top_k(jnp.where(rows[None, :] < valid, scores, -jnp.inf), m)
        return values, positions.astype(jnp.int32) + first

    return jax.shard_map(
        local, mesh=mesh, in_specs=(spec(), spec(axis), spec(axis), spec(axis)),
        out_specs=(spec(None, axis), spec(None, axis)), check_vma=False,
    )(queries, anchors, scales, bias)
