"""One rank of one replica group ("simulated node"). Env: RANK, WORLD_SIZE (ranks in this group),
MASTER_ADDR/MASTER_PORT (this group's own store), TORCHFT_LIGHTHOUSE, NODE (replica id), STEPS.
MODE=plain: theta is a plain tensor + torch AdamW; MODE=ds: a DeepSpeed ZeRO-3 engine on this
group's default process group holds a frozen Linear stack and theta; theta's local gradient
partition is averaged across replica groups through the torchft Manager before engine.step().
Prints one line per step: node, rank, step, quorum size, loss, sha of theta (the full vector)."""

import hashlib
import os
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn as nn
from torchft import Manager, ProcessGroupGloo

MODE = os.environ.get("MODE", "plain")
NODE = int(os.environ["NODE"])
STEPS = int(os.environ.get("STEPS", "20"))
SLEEP = float(os.environ.get("STEP_SLEEP", "0.5"))
D = 64
torch.manual_seed(0)


def log(*a):
    print(f"[node{NODE} r{os.environ['RANK']}]", *a, flush=True)


def sha(t):
    return hashlib.sha1(t.detach().float().contiguous().numpy().tobytes()).hexdigest()[:12]


def batch(step, rank):
    # deterministic per (global step, replica, rank)
    g = torch.Generator().manual_seed(1000 * step + 10 * NODE + rank)
    return torch.randn(8, D, generator=g)


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.base = nn.Sequential(nn.Linear(D, D), nn.Tanh(), nn.Linear(D, D))
        for p in self.base.parameters():
            p.requires_grad_(False)

    def forward(self, x):
        return self.base(x * (1 + self.theta)).pow(2).mean()


def main():
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if MODE == "ds":
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    else:
        dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    log("default group", dist.get_world_size(), "ranks")
    fns = {}
    manager = Manager(
        pg=ProcessGroupGloo(timeout=timedelta(seconds=10)),
        load_state_dict=lambda sd: fns["load"](sd),
        state_dict=lambda: fns["save"](),
        min_replica_size=1,
        replica_id=f"node{NODE}",
        timeout=timedelta(seconds=10),
        quorum_timeout=timedelta(seconds=60),
        use_async_quorum=os.environ.get("ASYNC_QUORUM", "1") == "1",
    )
    log("manager up")

    model = Model()
    if MODE == "ds":
        import deepspeed
        from deepspeed.utils import (
            safe_get_local_fp32_param,
            safe_get_local_grad,
            safe_get_local_optimizer_state,
            safe_set_local_fp32_param,
            safe_set_local_grad,
            safe_set_local_optimizer_state,
        )

        cfg = {
            "train_micro_batch_size_per_gpu": 8,
            "gradient_accumulation_steps": 1,
            "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
            "gradient_clipping": float(os.environ.get("CLIP", "1.0")),
            "steps_per_print": 10**9,
        }
        with deepspeed.zero.Init(config_dict_or_path=cfg):
            base = nn.Sequential(nn.Linear(D, D), nn.Tanh(), nn.Linear(D, D))
        model.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        model.theta = nn.Parameter(torch.zeros(D))
        opt = torch.optim.AdamW([model.theta], lr=1e-2)
        engine, opt, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
        theta = model.theta

        def adam_state():
            # AdamW creates its state lazily at the first step: before it, neither a sender nor a
            # receiver has 'exp_avg'. Create it exactly as AdamW would (zeros, step 0).
            flat = opt.fp32_partitioned_groups_flat[0]  # the key of the client AdamW's state
            st = opt.optimizer.state[flat]
            if not st:
                st.update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(flat), exp_avg_sq=torch.zeros_like(flat))
            return st

        def state_dict():
            st = adam_state()
            return {
                "theta": safe_get_local_fp32_param(theta).clone(),
                "exp_avg": safe_get_local_optimizer_state(theta, "exp_avg").clone(),
                "exp_avg_sq": safe_get_local_optimizer_state(theta, "exp_avg_sq").clone(),
                "adam_step": st["step"].clone(),
                "global_steps": engine.global_steps,
            }

        def load_state_dict(sd):
            log("HEAL: loading theta partition + Adam state from peer, global_steps", sd["global_steps"])
            st = adam_state()
            safe_set_local_fp32_param(theta, sd["theta"])
            safe_set_local_optimizer_state(theta, sd["exp_avg"], "exp_avg")
            safe_set_local_optimizer_state(theta, sd["exp_avg_sq"], "exp_avg_sq")
            st["step"] = sd["adam_step"].clone() if torch.is_tensor(sd["adam_step"]) else sd["adam_step"]
            theta.ds_tensor.data.copy_(sd["theta"].to(theta.ds_tensor.dtype))  # the model's own partition
            engine.global_steps = sd["global_steps"]

        def full_theta():
            from deepspeed import zero

            with zero.GatheredParameters([theta]):
                return theta.detach().clone()
    else:
        model.theta = nn.Parameter(torch.zeros(D))
        theta = model.theta
        opt = torch.optim.AdamW([theta], lr=1e-2)

        def state_dict():
            return {"theta": theta.detach().clone(), "opt": opt.state_dict()}

        def load_state_dict(sd):
            log("HEAL: loading theta + Adam state from peer")
            with torch.no_grad():
                theta.copy_(sd["theta"])
            opt.load_state_dict(sd["opt"])

        def full_theta():
            return theta.detach().clone()

    fns.update(load=load_state_dict, save=state_dict)
    while manager.current_step() < STEPS:
        t0 = time.perf_counter()
        manager.start_quorum()
        step = manager.current_step()
        x = batch(step, rank)
        if MODE == "ds":
            loss = engine(x)
            engine.backward(loss)
            g = safe_get_local_grad(theta)  # this rank's partition of the node-averaged gradient
            t1 = time.perf_counter()
            manager.allreduce(g).wait()  # average with the same partition in other nodes
            safe_set_local_grad(theta, g)
            ok = manager.should_commit()
            ft_ms = (time.perf_counter() - t1) * 1e3
            if ok:
                engine.step()
            else:
                engine.optimizer.zero_grad()  # drop this step's gradient
        else:
            opt.zero_grad()
            loss = model(x)
            loss.backward()
            dist.all_reduce(theta.grad)
            theta.grad /= world  # the intra-group reduction
            t1 = time.perf_counter()
            manager.allreduce(theta.grad).wait()
            ok = manager.should_commit()
            ft_ms = (time.perf_counter() - t1) * 1e3
            if ok:
                opt.step()
        log(
            f"step {step} -> {manager.current_step()} quorum {manager.num_participants()} "
            f"loss {loss.item():.6f} theta {sha(full_theta())} ft_ms {ft_ms:.1f} "
            f"step_ms {(time.perf_counter() - t0) * 1e3:.1f}"
        )
        time.sleep(SLEEP)
    log("done")
    manager.shutdown(wait=False)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
