"""PyTorch rows of ``benchmarks/step_cost.py``: torch.optim.SGD, the floors, sam_edu.torch and
the pytorch_optimizer peers, each on its own copy of one model (see step_cost.py's docstring)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from _step_cost_common import Runner, tensor_shapes

import pytorch_optimizer as po
from pytorch_optimizer.lr_scheduler.proportion import ProportionScheduler

from sam_edu.torch import BSAM, GSAM, SAM, WSAM, LookSAM


def make_model(case: str, sizes: dict) -> nn.Module:
    if case == "cnn":
        c = sizes["channels"]
        return nn.Sequential(
            nn.Conv2d(3, c, 3, padding=1), nn.ReLU(),
            nn.Conv2d(c, 2 * c, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(2 * c, 2 * c, 3, padding=1), nn.ReLU(),
            nn.Conv2d(2 * c, 4 * c, 3, stride=2, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * c, 10),
        )
    widths = sizes["widths"]
    layers = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def versions() -> dict:
    return {"torch": torch.__version__, "torch_threads": torch.get_num_threads()}


def _weights(params):
    return lambda: [p.detach().cpu().numpy().copy() for p in params]


def build(case: str, sizes: dict, hp: dict, peer_foreach: bool, seed: int) -> tuple[list, dict]:
    torch.manual_seed(seed)
    lr, momentum, rho = hp["lr"], hp["momentum"], hp["rho"]
    base_kwargs = dict(lr=lr, momentum=momentum)
    peer_kwargs = dict(foreach=True) if peer_foreach else {}
    k, la = hp["looksam_k"], hp["looksam_alpha"]
    bsam_kwargs = dict(num_data=hp["bsam_num_data"], lr=hp["bsam_lr"], rho=hp["bsam_rho"])
    if case == "tensors":
        return _build_tensors(sizes, hp, base_kwargs, peer_kwargs, bsam_kwargs, seed)

    batch = sizes["batch"]
    if case == "cnn":
        x = torch.rand(batch, 3, sizes["image_size"], sizes["image_size"])
    else:
        x = torch.rand(batch, sizes["widths"][0])
    y = torch.randint(0, 10, (batch,))
    init = make_model(case, sizes)
    runners = []

    def add(name, role, implementation, make_opt, drive, **kw):
        model = make_model(case, sizes)
        model.load_state_dict(init.state_dict())
        params = list(model.parameters())
        passes = [0]

        def count(module, inputs):
            passes[0] += 1

        model.register_forward_pre_hook(count)
        opt = make_opt(model, params)

        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss

        closure()  # gradients exist before the first step (pytorch_optimizer's BSAM needs them)
        runners.append(Runner(name=name, role=role, implementation=implementation,
                              step=drive(opt, closure, model), weights=_weights(params),
                              count_passes=lambda: passes[0], **kw))

    sgd = lambda model, params: torch.optim.SGD(params, **base_kwargs)  # noqa: E731

    def base_step(opt, closure, model):
        def step():
            closure()
            opt.step()
        return step

    def floor_step(opt, closure, model):
        def step():
            closure()
            closure()
            opt.step()
        return step

    def bsam_floor(opt, closure, model):
        n = sum(p.numel() for p in model.parameters())
        generator = torch.Generator().manual_seed(seed)

        def step():
            closure()
            closure()
            torch.randn(n, generator=generator)
        return step

    def closure_step(opt, closure, model):
        return lambda: opt.step(closure)

    def pass_then_closure_step(opt, closure, model):  # pytorch_optimizer's SAM and LookSAM
        def step():
            closure()
            opt.step(closure)
        return step

    add("SGD", "base", "torch.optim.SGD(momentum)", sgd, base_step, passes_per_step=1)
    add("floor", "floor", "2 passes + SGD step", sgd, floor_step, passes_per_step=2)
    add("floor bSAM", "floor", "2 passes + its noise (torch.randn)", sgd, bsam_floor,
        passes_per_step=2)
    ours = [
        ("SAM", "sam_edu.torch.SAM",
         lambda m, p: SAM(p, torch.optim.SGD, rho=rho, **base_kwargs), "floor", 2),
        ("ASAM", "sam_edu.torch.SAM(adaptive=True)",
         lambda m, p: SAM(p, torch.optim.SGD, rho=hp["asam_rho"], adaptive=True,
                          eta=hp["asam_eta"], **base_kwargs), "floor", 2),
        ("GSAM", "sam_edu.torch.GSAM",
         lambda m, p: GSAM(p, torch.optim.SGD, rho=rho, alpha=hp["gsam_alpha"], **base_kwargs),
         "floor", 2),
        ("WSAM", "sam_edu.torch.WSAM",
         lambda m, p: WSAM(p, torch.optim.SGD, rho=rho, gamma=hp["wsam_gamma"], **base_kwargs),
         "floor", 2),
        ("bSAM", "sam_edu.torch.BSAM",
         lambda m, p: BSAM(p, seed=seed, **bsam_kwargs), "floor bSAM", 2),
        (f"LookSAM k={k}", "sam_edu.torch.LookSAM",
         lambda m, p: LookSAM(p, torch.optim.SGD, rho=rho, k=k, alpha=la, **base_kwargs),
         None, 1 + 1 / k),
    ]
    for name, impl, make, floor, passes in ours:
        add(name, "ours", impl, make, closure_step, floor=floor,
            peer=(None if name == "ASAM" else f"pytorch_optimizer {name}"),
            passes_per_step=passes)

    def peer_gsam(model, params):
        base = torch.optim.SGD(params, **base_kwargs)
        constant = torch.optim.lr_scheduler.LambdaLR(base, lambda _: 1.0)
        rho_scheduler = ProportionScheduler(constant, max_lr=lr, min_lr=lr, max_value=rho,
                                            min_value=rho)
        opt = po.GSAM(params, base, model, rho_scheduler, alpha=hp["gsam_alpha"], **peer_kwargs)
        opt.set_closure(F.cross_entropy, x, y)
        return opt

    def gsam_step(opt, closure, model):
        def step():
            opt.step()
            opt.update_rho_t()
        return step

    peers = [
        ("SAM", "pytorch_optimizer.SAM: closure(); step(closure)",
         lambda m, p: po.SAM(p, torch.optim.SGD, rho=rho, **peer_kwargs, **base_kwargs),
         pass_then_closure_step, "floor", 2),
        ("GSAM", "pytorch_optimizer.GSAM: set_closure(); step(); update_rho_t()",
         peer_gsam, gsam_step, "floor", 2),
        ("WSAM", "pytorch_optimizer.WSAM: step(closure)",
         lambda m, p: po.WSAM(m, p, torch.optim.SGD, rho=rho, gamma=hp["wsam_gamma"],
                              **peer_kwargs, **base_kwargs), closure_step, "floor", 2),
        ("bSAM", "pytorch_optimizer.BSAM: step(closure)",
         lambda m, p: po.BSAM(p, **bsam_kwargs, **peer_kwargs), closure_step, "floor bSAM", 2),
        (f"LookSAM k={k}", "pytorch_optimizer.LookSAM: closure(); step(closure)",
         lambda m, p: po.LookSAM(p, torch.optim.SGD, rho=rho, k=k, alpha=la, **peer_kwargs,
                                 **base_kwargs), pass_then_closure_step, None, 2),
    ]
    for name, impl, make, drive, floor, passes in peers:
        add(f"pytorch_optimizer {name}", "peer", impl, make, drive, floor=floor,
            passes_per_step=passes)
    info = dict(parameters=sum(p.numel() for p in init.parameters()),
                input_shape=list(x.shape), tensors=len(list(init.parameters())))
    return runners, info


def _build_tensors(sizes, hp, base_kwargs, peer_kwargs, bsam_kwargs, seed):
    """Case (c): optimizer only. Gradients are set once; a step is ``first_step()`` +
    ``second_step()`` (bSAM: ``noisy_step()`` first) against ``SGD.step()``."""
    generator = torch.Generator().manual_seed(seed)
    shapes = tensor_shapes(sizes)
    init = [torch.randn(s, generator=generator) for s in shapes]
    grads = [torch.randn(s, generator=generator) for s in shapes]
    rho, k, la = hp["rho"], hp["looksam_k"], hp["looksam_alpha"]
    runners = []

    def add(name, role, implementation, make_opt, drive, **kw):
        params = [nn.Parameter(w.clone()) for w in init]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt = make_opt(params)
        runners.append(Runner(name=name, role=role, implementation=implementation,
                              step=drive(opt, params), weights=_weights(params), **kw))

    def restoring(inner):
        """LookSAM (ours and the peer) writes its direction into ``p.grad``: the preset gradients
        are copied back after each step (one ``torch._foreach_copy_``, part of the timed step)."""
        def drive(opt, params):
            step = inner(opt, params)
            current = [p.grad for p in params]

            def restored():
                step()
                torch._foreach_copy_(current, grads)
            return restored
        return drive

    def base(opt, params):
        return opt.step

    def two_steps(opt, params):
        def step():
            opt.first_step()
            opt.second_step()
        return step

    def bsam_steps(opt, params):
        def step():
            opt.noisy_step()
            opt.first_step()
            opt.second_step()
        return step

    def looksam_steps(opt, params):
        def step():
            if opt.first_step():
                opt.second_step()
        return step

    def noise(opt, params):
        n = sum(p.numel() for p in params)
        gen = torch.Generator().manual_seed(seed)
        return lambda: torch.randn(n, generator=gen)

    def peer_gsam(params):
        sgd = torch.optim.SGD(params, **base_kwargs)
        constant = torch.optim.lr_scheduler.LambdaLR(sgd, lambda _: 1.0)
        lr = base_kwargs["lr"]
        sched = ProportionScheduler(constant, max_lr=lr, min_lr=lr, max_value=rho, min_value=rho)
        return po.GSAM(params, sgd, nn.Module(), sched, alpha=hp["gsam_alpha"], **peer_kwargs)

    def gsam_steps(opt, params):
        def step():  # GSAM.step() without its two forward/backward passes
            opt.perturb_weights(rho=opt.rho_t)
            opt.gradient_decompose(opt.alpha)
            opt.un_perturb()
            opt.base_optimizer.step()
        return step

    def bsam_peer_steps(opt, params):
        def step():
            opt.first_step()
            opt.second_step()
            opt.third_step()
        return step

    sgd = lambda p: torch.optim.SGD(p, **base_kwargs)  # noqa: E731
    add("SGD", "base", "torch.optim.SGD(momentum).step()", sgd, base)
    add("floor bSAM", "floor", "its noise only (torch.randn)", sgd, noise)
    ours = [
        ("SAM", "sam_edu.torch.SAM", lambda p: SAM(p, torch.optim.SGD, rho=rho, **base_kwargs),
         two_steps, "SGD"),
        ("ASAM", "sam_edu.torch.SAM(adaptive=True)",
         lambda p: SAM(p, torch.optim.SGD, rho=hp["asam_rho"], adaptive=True, eta=hp["asam_eta"],
                       **base_kwargs), two_steps, "SGD"),
        ("GSAM", "sam_edu.torch.GSAM",
         lambda p: GSAM(p, torch.optim.SGD, rho=rho, alpha=hp["gsam_alpha"], **base_kwargs),
         two_steps, "SGD"),
        ("WSAM", "sam_edu.torch.WSAM",
         lambda p: WSAM(p, torch.optim.SGD, rho=rho, gamma=hp["wsam_gamma"], **base_kwargs),
         two_steps, "SGD"),
        ("bSAM", "sam_edu.torch.BSAM", lambda p: BSAM(p, seed=seed, **bsam_kwargs), bsam_steps,
         "floor bSAM"),
        (f"LookSAM k={k}", "sam_edu.torch.LookSAM",
         lambda p: LookSAM(p, torch.optim.SGD, rho=rho, k=k, alpha=la, **base_kwargs),
         restoring(looksam_steps), "SGD"),
    ]
    for name, impl, make, drive, floor in ours:
        add(name, "ours", impl, make, drive, floor=floor,
            peer=(None if name == "ASAM" else f"pytorch_optimizer {name}"),
            note=("the preset gradients are copied back after each step (LookSAM writes its "
                  "direction into p.grad)" if name.startswith("LookSAM") else ""))
    peers = [
        ("SAM", "pytorch_optimizer.SAM: first_step(); second_step()",
         lambda p: po.SAM(p, torch.optim.SGD, rho=rho, **peer_kwargs, **base_kwargs), two_steps,
         "SGD"),
        ("GSAM", "pytorch_optimizer.GSAM: perturb_weights, gradient_decompose, un_perturb, "
         "base step", peer_gsam, gsam_steps, "SGD"),
        ("WSAM", "pytorch_optimizer.WSAM: first_step(); second_step()",
         lambda p: po.WSAM(nn.Module(), p, torch.optim.SGD, rho=rho, gamma=hp["wsam_gamma"],
                           **peer_kwargs, **base_kwargs), two_steps, "SGD"),
        ("bSAM", "pytorch_optimizer.BSAM: first_step(); second_step(); third_step()",
         lambda p: po.BSAM(p, **bsam_kwargs, **peer_kwargs), bsam_peer_steps, "floor bSAM"),
        (f"LookSAM k={k}", "pytorch_optimizer.LookSAM: first_step(); second_step()",
         lambda p: po.LookSAM(p, torch.optim.SGD, rho=rho, k=k, alpha=la, **peer_kwargs,
                              **base_kwargs), restoring(two_steps), "SGD"),
    ]
    for name, impl, make, drive, floor in peers:
        add(f"pytorch_optimizer {name}", "peer", impl, make, drive, floor=floor,
            note=("the preset gradients are copied back after each step (LookSAM writes its "
                  "direction into p.grad)" if name.startswith("LookSAM") else ""))
    info = dict(parameters=sum(w.numel() for w in init), tensors=len(init),
                tensor_shapes=sorted({str(list(s)) for s in shapes}))
    return runners, info

