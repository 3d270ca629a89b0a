"""Print the paper's learning-rate schedule and check eq. (10) + correction = eq. (9).

    python experiments/show_schedule.py [--steps-per-epoch N]

A quick look at the rules before a long run: the rate at the start, middle
and end of warmup and at each decay, for several minibatch sizes, and the
largest difference between the two momentum forms over a full schedule.
"""

import argparse

import jax
import jax.numpy as jnp
import optax

import lsgd_jax

IMAGENET_TRAIN = 1_281_167


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", default="256,1024,8192,32768",
                        help="comma-separated total minibatch sizes kn")
    parser.add_argument("--warmup", default="gradual", choices=["gradual", "constant", "none"])
    args = parser.parse_args()

    print(f"{'kn':>6} {'steps/ep':>8} {'lr(0)':>8} {'lr(W/2)':>8} {'lr(W)':>8} "
          f"{'ep30':>8} {'ep60':>8} {'ep80':>8}")
    for kn in (int(s) for s in args.batch_sizes.split(",")):
        spe = IMAGENET_TRAIN // kn
        lr = lsgd_jax.goyal_schedule(batch_size=kn, steps_per_epoch=spe, warmup=args.warmup)
        w = 5 * spe
        vals = [lr(0), lr(w // 2), lr(w), lr(30 * spe), lr(60 * spe), lr(80 * spe)]
        print(f"{kn:>6} {spe:>8} " + " ".join(f"{float(v):>8.4f}" for v in vals))

    # eq. (10) with and without the momentum correction against eq. (9), 30 epochs of 20 steps.
    schedule = lsgd_jax.goyal_schedule(batch_size=8192, steps_per_epoch=20, decay_epochs=(10, 20))
    params = {"w": jnp.ones((64,))}
    results = {}
    for name, kw in {"eq9": dict(form="eq9"), "eq10+correction": dict(form="eq10"),
                     "eq10 uncorrected": dict(form="eq10", momentum_correction=False)}.items():
        tx = lsgd_jax.goyal_sgd(schedule, weight_decay=0.0, **kw)
        p, state = params, tx.init(params)
        update = jax.jit(tx.update)
        for t in range(600):
            g = {"w": jax.random.normal(jax.random.fold_in(jax.random.key(0), t), (64,))}
            u, state = update(g, state, p)
            p = optax.apply_updates(p, u)
        results[name] = p["w"]
    for name in ("eq10+correction", "eq10 uncorrected"):
        diff = float(jnp.max(jnp.abs(results[name] - results["eq9"])))
        scale = float(jnp.max(jnp.abs(results["eq9"])))
        print(f"{name:>17} vs eq9 after 600 steps through warmup and decays: "
              f"max |Δw| / max |w| = {diff / scale:.2e}")


if __name__ == "__main__":
    main()
