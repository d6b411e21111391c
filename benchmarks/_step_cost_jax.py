"""JAX rows of ``benchmarks/step_cost.py``: optax.sgd, the floors, sam_edu.jax and
optax.contrib.sam, each whole training step one ``jax.jit`` function (see step_cost.py).

The floors get the batch twice, as two separate input buffers holding the same values, so that
XLA cannot merge their two passes into one (the SAM rows' second pass runs at ``w + e``, which
XLA cannot merge either). Every gradient a floor computes is read, so none is removed as dead
code: the floor steps with ``g1 + g2`` (the addition fuses into the update), ``floor bSAM`` sums
both gradients and its noise into one number.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import optax.contrib

from _step_cost_common import Runner, tensor_arrays

from sam_edu.jax import adversarial_sam, bsam, gsam, looksam, normalize, sam, wsam


def versions() -> dict:
    return {"jax": jax.__version__, "optax": optax.__version__,
            "jax_device": str(jax.devices()[0]),
            "cpus_allowed": (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                             else os.cpu_count())}


def init_params(case: str, sizes: dict, rng: np.random.Generator):
    """NumPy weights (He normal, zero bias), NHWC/HWIO for the CNN."""
    if case == "cnn":
        c = sizes["channels"]
        convs = [(3, c, 1), (c, 2 * c, 2), (2 * c, 2 * c, 1), (2 * c, 4 * c, 2)]
        params = {"conv": [], "dense": None}
        for cin, cout, _ in convs:
            w = rng.normal(0, np.sqrt(2 / (9 * cin)), (3, 3, cin, cout)).astype(np.float32)
            params["conv"].append((w, np.zeros(cout, np.float32)))
        params["dense"] = (rng.normal(0, np.sqrt(1 / (4 * c)), (4 * c, 10)).astype(np.float32),
                           np.zeros(10, np.float32))
        return params, [s for _, _, s in convs]
    widths = sizes["widths"]
    return [(rng.normal(0, np.sqrt(2 / a), (a, b)).astype(np.float32), np.zeros(b, np.float32))
            for a, b in zip(widths[:-1], widths[1:])], None


def make_loss(case: str, strides):
    if case == "cnn":
        def apply(params, x):
            for (w, b), s in zip(params["conv"], strides):
                x = jax.lax.conv_general_dilated(x, w, (s, s), ((1, 1), (1, 1)),
                                                 dimension_numbers=("NHWC", "HWIO", "NHWC"))
                x = jax.nn.relu(x + b)
            w, b = params["dense"]
            return jnp.mean(x, axis=(1, 2)) @ w + b
    else:
        def apply(params, x):
            for i, (w, b) in enumerate(params):
                x = x @ w + b
                if i < len(params) - 1:
                    x = jax.nn.relu(x)
            return x

    def loss(params, x, y):
        return optax.softmax_cross_entropy_with_integer_labels(apply(params, x), y).mean()
    return loss


def build(case: str, sizes: dict, hp: dict, peer_foreach: bool, seed: int) -> tuple[list, dict]:
    rng = np.random.default_rng(seed)
    lr, momentum, rho, k = hp["lr"], hp["momentum"], hp["rho"], hp["looksam_k"]
    if case == "tensors":
        init, g_np, t_np = tensor_arrays(sizes, rng)
        # the data: the preset gradient at w and the quadratic loss's target, twice
        data = (jax.tree.map(jnp.asarray, g_np), jax.tree.map(jnp.asarray, t_np),
                jax.tree.map(jnp.array, t_np))

        def grad_at(params, g, t):
            return jax.tree.map(lambda w, ti: w - ti, params, t)

        def first_grad(params, data):
            return data[0]

        def grad_a(params, data):
            return grad_at(params, None, data[1])

        def grad_b(params, data, after=None):
            return grad_at(params, None, data[2])
        info = dict(parameters=sum(w.size for w in init), tensors=len(init),
                    tensor_shapes=sorted({str(list(a.shape)) for a in init}), input_shape=None)
    else:
        init, strides = init_params(case, sizes, rng)
        loss = make_loss(case, strides)
        grad = jax.grad(loss)
        batch = sizes["batch"]
        if case == "cnn":
            x = rng.random((batch, sizes["image_size"], sizes["image_size"], 3), np.float32)
        else:
            x = rng.random((batch, sizes["widths"][0]), np.float32)
        y = rng.integers(0, 10, batch).astype(np.int32)
        data = (jnp.asarray(x), jnp.asarray(y), jnp.array(x), jnp.array(y))

        def first_grad(params, data):
            return grad(params, data[0], data[1])

        grad_a = first_grad

        def grad_b(params, data, after=None):
            """Pass 2 of a floor, on the second copy of the batch. ``after`` (the first pass's
            gradient) makes it wait for pass 1, as SAM's pass 2 waits for ``w + e``: the batch
            gets ``0 *`` the sum of the first layer's bias gradient, the last one a backward
            pass computes (XLA keeps a float multiplication by zero). Otherwise XLA may
            interleave two independent passes, which ran slower than SAM on the CNN."""
            x2 = data[2]
            if after is not None:
                x2 = x2 + 0.0 * jnp.sum(jax.tree.leaves(after)[1])
            return grad(params, x2, data[3])
        info = dict(parameters=sum(a.size for a in jax.tree.leaves(init)),
                    tensors=len(jax.tree.leaves(init)),
                    input_shape=list(x.shape))

    sgd = optax.sgd(lr, momentum=momentum)
    runners = []

    def add(name, role, implementation, fn, opt_init, floor=None, peer=None, passes=None,
            note="", donate=True):
        """``fn(params, opt_state, data) -> (params, opt_state, *outputs)``, jitted."""
        state = {"params": jax.tree.map(jnp.array, init)}
        state["opt"] = opt_init(state["params"])
        jitted = jax.jit(fn, donate_argnums=(0, 1) if donate else ())

        def step():
            state["params"], state["opt"], *state["out"] = jitted(state["params"], state["opt"],
                                                                 data)

        def temp_bytes():
            """XLA's scratch memory for one step: buffers beyond the inputs and outputs."""
            compiled = jitted.lower(state["params"], state["opt"], data).compile()
            return compiled.memory_analysis().temp_size_in_bytes

        runners.append(Runner(
            name=name, role=role, implementation=implementation, step=step,
            weights=lambda: [np.array(a) for a in jax.tree.leaves(state["params"])],
            sync=lambda: jax.block_until_ready((state["params"], state["opt"])),
            floor=floor, peer=peer, mode="jit", passes_per_step=passes, temp_bytes=temp_bytes,
            note=note))

    def base_fn(params, s, data):
        u, s = sgd.update(first_grad(params, data), s, params)
        return optax.apply_updates(params, u), s

    def floor_fn(params, s, data):
        g1 = first_grad(params, data)
        g2 = grad_b(params, data, after=g1)
        # g1 is used, as any SAM step uses it, by one addition that XLA fuses into the update
        # (returning it instead would allocate a fresh output buffer at every step)
        u, s = sgd.update(jax.tree.map(jnp.add, g1, g2), s, params)
        return optax.apply_updates(params, u), s

    n_total = info["parameters"]

    def floor_bsam_fn(params, key, data):
        g1 = first_grad(params, data)
        g2 = grad_b(params, data, after=g1)
        key, sub = jax.random.split(key)
        noise = jax.random.normal(sub, (n_total,))
        # everything is read once, into one number: nothing is dead code, nothing is written
        used = sum(jnp.sum(a) + jnp.sum(b) for a, b in zip(jax.tree.leaves(g1),
                                                            jax.tree.leaves(g2)))
        return params, key, used + jnp.sum(noise)

    passes_model = case != "tensors"
    two = 2 if passes_model else None
    add("SGD", "base", "optax.sgd(momentum)", base_fn, sgd.init, passes=1 if passes_model else None)
    add("floor", "floor", "2 passes + optax.sgd step with g1 + g2", floor_fn, sgd.init, passes=two)
    add("floor bSAM", "floor", "2 passes + its noise (jax.random.normal), all summed",
        floor_bsam_fn,
        lambda p: jax.random.key(seed), passes=two, donate=False)
    # LookSAM's floor: the base step, and the floor's two passes on every k-th step, chosen in
    # Python between two jitted functions (no lax.cond: XLA:CPU compiles convolutions inside a
    # branch into slow loops, see sam_edu.jax.looksam)
    look = {"params": jax.tree.map(jnp.array, init), "count": 0}
    look["opt"] = sgd.init(look["params"])
    look_fns = (jax.jit(floor_fn, donate_argnums=(0, 1)), jax.jit(base_fn, donate_argnums=(0, 1)))

    def look_step():
        fn = look_fns[0] if look["count"] % k == 0 else look_fns[1]
        look["params"], look["opt"], *_ = fn(look["params"], look["opt"], data)
        look["count"] += 1

    runners.append(Runner(
        name=f"floor LookSAM k={k}", role="floor",
        implementation=f"the floor's step every {k}th step, the base step otherwise",
        step=look_step, weights=lambda: [np.array(a) for a in jax.tree.leaves(look["params"])],
        sync=lambda: jax.block_until_ready((look["params"], look["opt"])), mode="jit",
        passes_per_step=(1 + 1 / k) if passes_model else None))

    def with_grad_fn(opt, first=True):
        def fn(params, s, data):
            g = first_grad(params, data) if first else None
            u, s = opt.update(g, s, params, grad_fn=lambda p: grad_a(p, data))
            return optax.apply_updates(params, u), s
        return fn

    def opaque(opt):
        def fn(params, s, data):
            u, s = opt.update(first_grad(params, data), s, params,
                              grad_fn=lambda p, i: grad_a(p, data))
            return optax.apply_updates(params, u), s
        return fn

    ours = [
        ("SAM", "sam_edu.jax.sam", sam(sgd, rho=rho), True, "floor", "optax.contrib.sam", two),
        ("ASAM", "sam_edu.jax.sam(adaptive=True)",
         sam(sgd, rho=hp["asam_rho"], adaptive=True, eta=hp["asam_eta"]), True, "floor", None,
         two),
        ("GSAM", "sam_edu.jax.gsam", gsam(sgd, rho=rho, alpha=hp["gsam_alpha"]), True, "floor",
         None, two),
        ("WSAM", "sam_edu.jax.wsam", wsam(sgd, learning_rate=lr, rho=rho, gamma=hp["wsam_gamma"]),
         True, "floor", None, two),
        ("bSAM", "sam_edu.jax.bsam: update(None, ..., grad_fn)",
         bsam(hp["bsam_num_data"], learning_rate=hp["bsam_lr"], rho=hp["bsam_rho"], seed=seed),
         False,
         "floor bSAM", None, two),
        (f"LookSAM k={k}", "sam_edu.jax.looksam",
         looksam(sgd, rho=rho, k=k, alpha=hp["looksam_alpha"]), True, f"floor LookSAM k={k}",
         None, (1 + 1 / k) if passes_model else None),
    ]
    for name, impl, opt, first, floor, peer, passes in ours:
        add(name, "ours", impl, with_grad_fn(opt, first), opt.init, floor=floor, peer=peer,
            passes=passes)
    adv = adversarial_sam(sgd, optax.chain(normalize(), optax.sgd(rho)), sync_period=2,
                          opaque_mode=True)
    add("SAM (adversarial_sam)", "ours",
        "sam_edu.jax.adversarial_sam(sgd, chain(normalize(), sgd(rho)), 2, opaque_mode=True)",
        opaque(adv), adv.init, floor="floor", peer="optax.contrib.sam", passes=two)
    peer = optax.contrib.sam(sgd, optax.chain(optax.contrib.normalize(), optax.sgd(rho)),
                             sync_period=2, opaque_mode=True)
    add("optax.contrib.sam", "peer",
        "optax.contrib.sam(sgd, chain(normalize(), sgd(rho)), 2, opaque_mode=True)",
        opaque(peer), peer.init, floor="floor", passes=two,
        note="opaque mode: one update with grad_fn is one SAM step (two passes)")
    return runners, info
