"""tf.distribute support: replica components, pooled moving statistics, sync BN.

Strategies: the default one, `OneDeviceStrategy`, `MirroredStrategy` and
`MultiWorkerMirroredStrategy` (and their TF1 classes). Any other raises a
ValueError when fused_bn is called under it: `CentralStorageStrategy` and
`ParameterServerStrategy` keep one copy of each variable that every replica
would update in place, and TPUs have no kernel for the op.

In a replica context with R > 1 replicas in sync, a training call runs
  local moments (`FusedBn>Moments`, skipped for an empty shard)
  -> sync: one all-reduce of [R, 2C+1] (count, mean, M2) slots, merged
     exactly (the pooled formula, no E[x^2] - E[x]^2), or
     non-sync: one all-reduce of [2C+1] shifted sums, for the update only
  -> `FusedBn>Normalize` with the global (sync) or local statistics
  -> `FusedBn>UpdateMovingStats` of this replica's components with the
     statistics of the global batch, the same on every replica.
Its gradient is `FusedBn>BackwardReduce` (local sums) -> (sync: one
all-reduce of [2, C]) -> `FusedBn>BackwardApply` (dx over the global count).
The Keras layer's masked path computes its own moments (a count per
channel) and merges them here (`merge_moments`): the same two all-reduces
with [R, 3C] and [3C] tensors; in sync mode its gradient goes through the
statistics' all-reduce (whose gradient is an all-reduce).
Statistics travel in float64; they are [C]-sized.
"""
import tensorflow as tf

from . import ops as _api
from ._loader import ops as _ops

_SUPPORTED = (
    tf.distribute.MirroredStrategy,
    tf.distribute.MultiWorkerMirroredStrategy,
    tf.distribute.OneDeviceStrategy,
    tf.compat.v1.distribute.MirroredStrategy,
    tf.compat.v1.distribute.experimental.MultiWorkerMirroredStrategy,
    tf.compat.v1.distribute.OneDeviceStrategy,
)
_F64 = tf.float64
_SUM = tf.distribute.ReduceOp.SUM


def check_strategy():
    """Raises ValueError under a tf.distribute strategy fused_bn does not support."""
    if not tf.distribute.has_strategy():
        return
    strategy = tf.distribute.get_strategy()
    if isinstance(strategy, _SUPPORTED):
        return
    raise ValueError(
        "fused_bn supports tf.distribute.MirroredStrategy, "
        "MultiWorkerMirroredStrategy and OneDeviceStrategy, got "
        f"{type(strategy).__name__}: its replicas would all update one copy "
        "of the moving statistics in place (CentralStorageStrategy, "
        "ParameterServerStrategy), or its devices have no fused_bn kernel "
        "(TPUStrategy)")


def replica_context():
    """The replica context when there are replicas to communicate with
    (more than one in sync), else None."""
    if not tf.distribute.has_strategy():
        return None
    ctx = tf.distribute.get_replica_context()
    if ctx is None or ctx.num_replicas_in_sync == 1:
        return None
    return ctx


def handles(var, name, write):
    """The resource handles of tf.Variable `var` that an op reads (write=False:
    one) or updates in place (write=True: every copy that must change).

    In a replica context a distributed variable's handle is the replica's own
    component. Elsewhere (cross-replica context, no strategy) the op reads
    the first local component and updates all of them, so a mirrored
    variable stays mirrored.
    """
    if not isinstance(var, tf.distribute.DistributedValues):
        ctx = replica_context() if write else None
        if ctx is not None:
            raise ValueError(
                f"{name} must be created under the strategy's scope (a "
                f"MirroredVariable) to be updated in a replica context: each "
                f"of the {ctx.num_replicas_in_sync} replicas would update "
                "this one variable in place")
        return [var.handle]
    if write and var.synchronization == tf.VariableSynchronization.ON_READ \
            and var.aggregation not in (tf.VariableAggregation.MEAN,
                                        tf.VariableAggregation.ONLY_FIRST_REPLICA):
        raise ValueError(
            f"{name} is a sync-on-read variable with aggregation "
            f"{var.aggregation.name}: fused_bn keeps every replica's copy "
            "equal, which reads back right only with MEAN or "
            "ONLY_FIRST_REPLICA aggregation (or a mirrored variable)")
    if tf.distribute.in_cross_replica_context() or not tf.distribute.has_strategy():
        components = var.distribute_strategy.experimental_local_results(var)
        return [c.handle for c in (components if write else components[:1])]
    return [var.handle]


def _local_count(x, data_format):
    """Values per channel in x: a Python int when static, else an int32
    scalar (int32 shape arithmetic stays in host memory on a GPU, so the
    empty-shard tf.cond does not wait for the device; a replica's channel
    never holds 2^31 values)."""
    count = _api._static_count(x, data_format)
    if count is not None:
        return count
    shape = tf.shape(x)
    ch = tf.rank(x) - 1 if data_format == "channels_last" else 1
    return tf.reduce_prod(tf.concat([shape[:ch], shape[ch + 1:]], 0))


def _local_moments(x, count, live, u, c, data_format):
    """Biased local (mean, variance); zeros for an empty shard or when `live`
    (training) is False at run time, without computing anything.

    An empty shard still goes through tf.cond, whose output depends on x:
    a tape then records the same collectives on every replica (a second
    derivative differentiates the statistics' all-reduce on all of them).
    """
    def compute():
        return tuple(_ops.fused_bn_moments(x=x, U=u, data_format=data_format))

    def zeros():
        z = tf.zeros([c], u)
        return z, z

    if live is True and isinstance(count, int) and count > 0:
        return compute()
    pred = tf.convert_to_tensor(count > 0) if isinstance(count, int) else count > 0
    if live is not True:
        pred = tf.logical_and(live, pred)
    return tf.cond(pred, compute, zeros)


def _global_moments(ctx, count, mean, var, u):
    """(mean, biased variance, count) of the union of the replicas' batches.

    count: a scalar (every channel's) or a [C] vector (per channel, for
    masked statistics); the result's count has the same shape. Replica r
    writes its (count, mean, M2) into row r of a zero [R, K+2C] float64
    tensor (K = 1 or C); one SUM all-reduce carries every replica's values
    exactly, and every replica merges them alike, per channel:
      N = sum n_r, mean = sum n_r mean_r / N,
      M2 = sum M2_r + sum n_r (mean_r - mean)^2
    (Chan's merge of R parts: no E[x^2] - E[x]^2; empty shards add nothing).
    Differentiable: the all-reduce's gradient is an all-reduce.
    """
    n = tf.cast(count, _F64)
    counts = tf.reshape(n, [-1])
    local = tf.concat([counts, tf.cast(mean, _F64), tf.cast(var, _F64) * n], 0)
    rid = tf.reshape(tf.cast(ctx.replica_id_in_sync_group, tf.int32), [1, 1])
    slots = tf.scatter_nd(rid, local[tf.newaxis],
                          tf.stack([ctx.num_replicas_in_sync, tf.size(local)]))
    slots = ctx.all_reduce(_SUM, slots)
    c = tf.size(mean)
    counts, means, m2 = tf.split(slots, tf.stack([tf.size(counts), c, c]), axis=1)
    total = tf.reduce_sum(counts, 0)
    safe = tf.maximum(total, 1.0)
    gmean = tf.reduce_sum(counts * means, 0) / safe
    from . import reference  # the bn_math.h mirror; it imports this module
    gm2 = tf.reduce_sum(reference.pooled_m2_term(counts, means, m2, gmean), 0)
    return (tf.cast(gmean, u), tf.cast(gm2 / safe, u),
            tf.reshape(tf.cast(total, tf.int64), tf.shape(count)))


def _pooled_moments(ctx, count, mean, var, shift, u):
    """(mean, biased variance, count) of the union of the replicas' batches,
    from one SUM all-reduce of [K+2C] float64 sums around `shift`, a
    per-channel value every replica holds alike (the moving mean); count is
    a scalar (K = 1) or per channel (K = C), as the result's:
      N = sum n_r, S1 = sum n_r d_r, S2 = sum (M2_r + n_r d_r^2),
      d_r = mean_r - shift; mean = shift + S1 / N, M2 = S2 - S1^2 / N.
    S2 and S1^2 / N cancel only by (mean - shift)^2 / variance, in float64.
    """
    n = tf.cast(count, _F64)
    d = tf.cast(mean, _F64) - tf.cast(shift, _F64)
    counts = tf.reshape(n, [-1])
    local = tf.concat([counts, n * d,
                       tf.cast(var, _F64) * n + n * tf.square(d)], 0)
    sums = ctx.all_reduce(_SUM, local)
    c = tf.size(mean)
    total, s1, s2 = tf.split(sums, tf.stack([tf.size(counts), c, c]))
    safe = tf.maximum(total, 1.0)
    gmean = tf.cast(shift, _F64) + s1 / safe
    gvar = tf.maximum(s2 - tf.square(s1) / safe, 0.0) / safe
    return (tf.cast(gmean, u), tf.cast(gvar, u),
            tf.reshape(tf.cast(total, tf.int64), tf.shape(count)))


def merge_moments(count, mean, var, shift, synchronized):
    """For statistics this replica computed itself (the layer's masked
    moments: count [C] int64, biased mean and variance [C]), in a replica
    context with several replicas: (batch, pooled), each (mean, variance,
    count), the statistics to normalize with and those of the union of the
    replicas' batches for the moving update (equal on every replica).

    synchronized: batch is pooled, Chan-merged from one all-reduce
    (`_global_moments`) and differentiable through it. Otherwise batch is
    this replica's own and pooled comes from one all-reduce of sums around
    `shift` ([C], equal on every replica: the moving mean), not
    differentiated.
    """
    ctx = replica_context()
    u = mean.dtype
    if synchronized:
        pooled = _global_moments(ctx, count, mean, var, u)
        return pooled, pooled
    pooled = _pooled_moments(
        ctx, count, tf.stop_gradient(mean), tf.stop_gradient(var),
        tf.stop_gradient(shift), u)
    return (mean, var, count), pooled


def _normalize(x, scale, offset, mean, variance, count, live, all_reduce,
               epsilon, data_format, side, activation):
    """y = `FusedBn>Normalize`(x; mean, variance, scale, offset), with the
    epilogue relu(... + side) when asked, and the batch-norm gradient of
    statistics over `count` values per channel.

    Training (`live`): dx from the sums of g and g * x_hat over those
    values, g = dy masked by y > 0 for relu (else dy): this replica's sums
    passed through `all_reduce` (None: the statistics are x's own). Frozen:
    dx = scale * inv_std * g. dscale and doffset are this replica's sums
    (the optimizer adds the replicas'); d(side_input) is g.
    """
    inv_std = tf.math.rsqrt(variance + tf.cast(epsilon, variance.dtype))

    @tf.custom_gradient
    def bn(x, scale, offset, *side):
        y = _ops.fused_bn_normalize(x=x, mean=mean, variance=variance,
                                    scale=scale, offset=offset,
                                    side_input=list(side), epsilon=epsilon,
                                    data_format=data_format,
                                    activation=activation)

        def grad(dy):
            if activation == "relu":
                dy = tf.where(y > 0, dy, tf.zeros_like(dy))
            sum_dy, sum_dy_xhat = _ops.fused_bn_backward_reduce(
                dy=dy, x=x, mean=mean, inv_std=inv_std, data_format=data_format)
            sums = tf.stack([sum_dy, sum_dy_xhat])
            if all_reduce is not None:
                sums = all_reduce(sums)
            if live is not True:
                sums = tf.where(live, sums, tf.zeros_like(sums))
            dx = _ops.fused_bn_backward_apply(
                dy=dy, x=x, scale=scale, mean=mean, inv_std=inv_std,
                sum_dy=sums[0], sum_dy_xhat=sums[1],
                count=tf.maximum(tf.cast(count, tf.int64), 1),
                data_format=data_format)
            return (dx, sum_dy_xhat, sum_dy) + tuple(dy for _ in side)

        return y, grad

    return bn(x, scale, offset, *side)


def _read(handle, dtype):
    """A variable's value, as a constant for differentiation (the moving
    statistics get no gradient)."""
    return tf.stop_gradient(tf.raw_ops.ReadVariableOp(resource=handle, dtype=dtype))


def _update(targets, mean, var, count, live, momentum, unbiased):
    """UpdateMovingStats of every (mean, variance, counter) handle triple in
    `targets` with the same statistics; under tf.cond when `live` is a tensor."""
    def run(mh, vh, ch):
        return _ops.fused_bn_update_moving_stats(
            moving_mean=mh, moving_variance=vh, num_updates=ch, mean=mean,
            variance=var, count=count, momentum=momentum,
            unbiased_variance=unbiased)

    updates = []
    for mh, vh, ch in targets:
        if live is True:
            updates.append(run(mh, vh, ch))
            continue

        def branch(mh=mh, vh=vh, ch=ch):
            with tf.control_dependencies([run(mh, vh, ch)]):
                return tf.constant(True)

        updates.append(tf.cond(live, branch, lambda: tf.constant(False)))
    return updates


def _moving_handles(moving):
    """For (moving_mean, moving_variance, num_updates or None): the handle
    triples (mean, variance, [counter] or []) to update, one per component,
    and the (mean, variance) handles to read."""
    names = ("moving_mean", "moving_variance", "num_updates")
    lists = [handles(v, n, write=True) if v is not None else None
             for v, n in zip(moving, names)]
    if len({len(h) for h in lists if h is not None}) != 1:
        raise ValueError(
            "moving_mean, moving_variance and num_updates must be created "
            "under the same strategy")
    targets = [(mh, vh, [] if lists[2] is None else [lists[2][i]])
               for i, (mh, vh) in enumerate(zip(lists[0], lists[1]))]
    return targets, (lists[0][0], lists[1][0])


def _checked(stats, live):
    """stats (mean, variance, count), usable only once count >= 2 is checked
    (when training): an InvalidArgumentError before anything is updated."""
    ok = stats[2] >= 2
    if live is not True:
        ok = tf.logical_or(tf.logical_not(live), ok)
    check = tf.debugging.Assert(ok, [
        "training needs at least 2 values per channel over all replicas to "
        "compute batch statistics, got", stats[2]])
    with tf.control_dependencies([check]):
        return tuple(tf.identity(t) for t in stats)


def batch_norm(x, live, scale, offset, moving, *, u, c, data_format,
               momentum, epsilon, unbiased_variance, synchronized, side=(),
               activation="none"):
    """`fused_bn.batch_norm`'s training call (live: True, or a bool tensor)
    in a replica context or on distributed variables; see the module doc.

    moving: None or (moving_mean, moving_variance, num_updates or None),
    checked tf.Variables. side ([] or [a tensor like x]) and activation
    ('none' or 'relu'): the epilogue, as the ops take them.
    """
    ctx = replica_context()
    sync = bool(synchronized) and ctx is not None
    count = _local_count(x, data_format)
    mean_l, var_l = _local_moments(x, count, live, u, c, data_format)
    targets, values = [], None
    if moving is not None:
        targets, read_handles = _moving_handles(moving)
        if live is not True or (ctx is not None and not sync):
            values = tuple(_read(h, u) for h in read_handles)
    pooled = None
    if sync:
        batch = pooled = _checked(_global_moments(ctx, count, mean_l, var_l, u), live)
    else:
        batch = (mean_l, var_l, count)
        if ctx is not None and moving is not None:
            pooled = _checked(_pooled_moments(ctx, count, mean_l, var_l, values[0], u),
                              live)
        elif moving is not None:
            pooled = _checked((mean_l, var_l, tf.cast(count, tf.int64)), live)
    mean, var = batch[:2]
    if live is not True:
        mean = tf.where(live, mean, values[0])
        var = tf.where(live, var, values[1])
    y = _normalize(x, scale, offset, mean, var, batch[2], live,
                   (lambda t: ctx.all_reduce(_SUM, t)) if sync else None,
                   epsilon, data_format, side, activation)
    if targets:
        updates = _update(targets, *pooled, live, momentum, unbiased_variance)
        if not tf.executing_eagerly() and not tf.inside_function():
            # A TF1 graph runs only what y depends on.
            with tf.control_dependencies(updates):
                y = tf.identity(y)
    return y


@tf.RegisterGradient("FusedBn>BackwardReduce")
def _backward_reduce_grad(op, g_sum_dy, g_sum_dy_xhat):
    """Composite gradient (for second order) of
    sum_dy = sum(dy), sum_dy_xhat = sum(dy * (x - mean) * inv_std)."""
    dy, x, mean, inv_std = op.inputs
    data_format = _format_of(op)
    u = mean.dtype
    g1 = tf.zeros_like(mean) if g_sum_dy is None else g_sum_dy
    g2 = tf.zeros_like(mean) if g_sum_dy_xhat is None else g_sum_dy_xhat

    def b(v):
        return _api._broadcast_stat(v, x, data_format)

    dyu = tf.cast(dy, u)
    centered = tf.cast(x, u) - b(mean)
    d_dy = b(g1) + b(g2 * inv_std) * centered
    d_x = b(g2 * inv_std) * dyu
    d_mean = -g2 * inv_std * _batch_sum(dyu, data_format)
    d_inv_std = g2 * _batch_sum(dyu * centered, data_format)
    return [tf.cast(d_dy, dy.dtype), tf.cast(d_x, x.dtype), d_mean, d_inv_std]


@tf.RegisterGradient("FusedBn>BackwardApply")
def _backward_apply_grad(op, g):
    """Composite gradient (for second order) of
    dx = scale * r * (dy - S1 / N - (x - mean) * r * S2 / N), r = inv_std."""
    dy, x, scale, mean, r, s1, s2, count = op.inputs
    data_format = _format_of(op)
    u = mean.dtype

    def b(v):
        return _api._broadcast_stat(v, x, data_format)

    n = tf.cast(count, u)
    gu = tf.cast(g, u)
    dyu = tf.cast(dy, u)
    centered = tf.cast(x, u) - b(mean)
    k = scale * r
    sum_g = _batch_sum(gu, data_format)
    sum_gc = _batch_sum(gu * centered, data_format)
    sum_gdy = _batch_sum(gu * dyu, data_format)
    d_dy = b(k) * gu
    d_x = -b(k * r * s2 / n) * gu
    d_scale = r * (sum_gdy - s1 / n * sum_g - r * s2 / n * sum_gc)
    d_mean = k * r * s2 / n * sum_g
    d_r = scale * (sum_gdy - s1 / n * sum_g) - 2.0 * k * s2 / n * sum_gc
    d_s1 = -k / n * sum_g
    d_s2 = -k * r / n * sum_gc
    return [tf.cast(d_dy, dy.dtype), tf.cast(d_x, x.dtype), d_scale, d_mean,
            d_r, d_s1, d_s2, None]


def _format_of(op):
    """An op's data_format attribute as str (graph mode gives bytes)."""
    data_format = op.get_attr("data_format")
    return data_format.decode() if isinstance(data_format, bytes) else data_format


def _batch_sum(t, data_format):
    """Per-channel sum of t over every axis but the channel axis."""
    rank = tf.rank(t)
    axes = (tf.range(rank - 1) if data_format == "channels_last"
            else tf.concat([[0], tf.range(2, rank)], 0))
    return tf.reduce_sum(t, axes)
