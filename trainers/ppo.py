"""PPO for language models: the project's own trainer (TRL removed its PPOTrainer).

Follows the published recipe (Ziegler et al. 2019; Ouyang et al. 2022; the checklist of Huang et
al. 2024): policy = parent + LoRA; reference = the same network with the adapter switched off; a
linear value head on the policy's last hidden state, initialised at zero; rollouts sampled by the
policy (optionally several per prompt, each scored against its siblings' mean); the reward
model scores prompt + response once; per-token KL penalty with a fixed or
adaptive coefficient; GAE; whitened advantages; clipped policy and value losses; several epochs
over each rollout batch.

Masks. A response runs up to and including its first EOS; every later position is padding and is
masked everywhere. V_t is the value of the state *before* token t is emitted, read from the hidden
state of the token preceding it, so the value of the state after the last real token (terminal)
is 0 by construction: the log-prob and value masks are the same here, and GAE treats V past the
end as 0 (what the "value mask one further" rule of padded implementations achieves).

Data parallel (`accelerate launch --num_processes N`, see studio/launchers.py): `ppo.batch_size` and
`ppo.mini_batch_size` are global; each of the N ranks samples and scores its 1/N share of every
rollout batch (whole groups of a prompt's `samples_per_prompt` answers, so each answer's baseline
is computed on its own rank), and optimises over its share in mini-batches of mini_batch_size / N.
The policy and value head are one module prepared by accelerate (DDP: gloo on CPUs, NCCL on
GPUs), so every backward averages the gradients over the ranks. Score normalisation, the KL controller, the
advantage whitening and the logged metrics use statistics of the whole batch, gathered from the
ranks, so N processes compute what one process computes on the whole batch (up to the sampling
noise: each rank draws from its own random stream, seed + rank). Rank 0 writes metrics.jsonl, the
adapter, the value head and meta.json. One process (no launcher) runs exactly as before.

    python -m trainers.ppo --config data/recipes/ppo.yaml --snapshot SNAP --parent MODEL \
        --reward-model RM_DIR --output DIR
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trainers.common import (
    Reporter,
    fail,
    is_main,
    load_model,
    load_tokenizer,
    lora_config,
    moved_report,
    read_snapshot,
    run_main,
    save_policy_adapter,
    seed_everything,
    trainable_copy,
    write_meta,
)
from trainers.configs import ConfigError, PPOSettings, PPOStageConfig

RewardFn = Callable[[list[list[dict]], list[str], list[int]], list[float]]


# ---------------------------------------------------------------- the textbook pieces (unit-tested)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return (x - mean) * torch.rsqrt(var + 1e-8) * mask


def response_mask(response: torch.Tensor, eos_id: int) -> torch.Tensor:
    """1 for tokens up to and including the first EOS, 0 after it."""
    is_eos = (response == eos_id).long()
    after_eos = (is_eos.cumsum(-1) - is_eos) > 0
    return (~after_eos).float()


def leave_one_out(scores: torch.Tensor, group: int) -> torch.Tensor:
    """Each score less the mean of the other `group - 1` scores of its prompt (`scores` holds each
    prompt's answers side by side). A zero-started value head cannot tell a prompt that draws
    high scores from an answer that earns them; this baseline takes the prompt's share out."""
    if group < 2:  # one answer has no siblings: its baseline would be 0/0
        raise ValueError(f"leave_one_out needs 2 or more answers per prompt, not {group}")
    g = scores.view(-1, group)
    return (g - (g.sum(-1, keepdim=True) - g) / (group - 1)).view(-1)


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation backwards over the response; V and A are 0 past the end."""
    steps = rewards.shape[-1]
    advantages = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(steps)):
        next_mask = mask[:, t + 1] if t + 1 < steps else torch.zeros_like(last)
        next_value = values[:, t + 1] * next_mask if t + 1 < steps else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = delta + gamma * lam * next_mask * last
        advantages[:, t] = last * mask[:, t]
    returns = (advantages + values) * mask
    return advantages, returns


def policy_loss(
    new_logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped surrogate: mean over real tokens of max(-A r, -A clip(r, 1-eps, 1+eps)), and the clip share."""
    ratio = torch.exp(new_logp - old_logp)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - eps, 1 + eps)
    return masked_mean(torch.max(unclipped, clipped), mask), masked_mean((clipped > unclipped).float(), mask)


def value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """0.5 * mean of max((V - R)^2, (V_clipped - R)^2); and the share of tokens where clipping won."""
    clipped = old_values + torch.clamp(values - old_values, -eps, eps)
    plain_err, clipped_err = (values - returns) ** 2, (clipped - returns) ** 2
    return 0.5 * masked_mean(torch.max(plain_err, clipped_err), mask), masked_mean(
        (clipped_err > plain_err).float(), mask
    )


def kl_per_token(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    if estimator == "k1":
        return logp - ref_logp
    log_ratio = ref_logp - logp  # k3 = (r - 1) - log r with r = p_ref / p: unbiased, lower variance, >= 0
    return torch.expm1(log_ratio) - log_ratio


class FixedKL:
    def __init__(self, beta: float):
        self.beta = beta

    def update(self, kl: float, n_steps: int) -> None:
        pass


class AdaptiveKL(FixedKL):
    """Ziegler et al. 2019: e = clip(KL / target - 1, -0.2, 0.2); beta *= 1 + e * n_steps / horizon."""

    def __init__(self, beta: float, target: float, horizon: int):
        super().__init__(beta)
        self.target, self.horizon = target, horizon

    def update(self, kl: float, n_steps: int) -> None:
        error = min(max(kl / self.target - 1, -0.2), 0.2)
        self.beta *= 1 + error * n_steps / self.horizon


class RunningMoments:
    """Running mean and standard deviation of reward scores (batch-wise Welford)."""

    def __init__(self) -> None:
        self.mean, self.var, self.count = 0.0, 1.0, 0

    def update(self, xs: torch.Tensor) -> None:
        n = xs.numel()
        batch_mean, batch_var = xs.mean().item(), xs.var(unbiased=False).item()
        total = self.count + n
        delta = batch_mean - self.mean
        self.mean += delta * n / total
        self.var = (self.var * self.count + batch_var * n + delta**2 * self.count * n / total) / total
        self.count = total

    def normalise(self, xs: torch.Tensor) -> torch.Tensor:
        return (xs - self.mean) / max(self.var**0.5, 1e-6)


# ---------------------------------------------------------------- rewards


def rule_reward(name: str, tokenizer: Any) -> RewardFn:
    """Rule-based rewards for checks and demos: `spaces` (share of tokens that start a word), `brevity`."""

    def spaces(prompts: list, texts: list[str], lengths: list[int]) -> list[float]:
        return [t.count(" ") / max(n, 1) for t, n in zip(texts, lengths, strict=True)]

    def brevity(prompts: list, texts: list[str], lengths: list[int]) -> list[float]:
        return [-n / 64 for n in lengths]

    rules = {"spaces": spaces, "brevity": brevity}
    if name not in rules:
        raise SystemExit(f"error: --reward-model rule:{name}: unknown rule; use one of {', '.join(rules)}")
    return rules[name]


def model_reward(folder: Path) -> RewardFn:
    from trainers.reward import load_reward_model, score

    model, tokenizer = load_reward_model(folder)

    def fn(prompts: list[list[dict]], texts: list[str], lengths: list[int]) -> list[float]:
        # decode and re-encode: the reward model may tokenize differently from the policy
        return score(
            model,
            tokenizer,
            [[*p, {"role": "assistant", "content": t}] for p, t in zip(prompts, texts, strict=True)],
        )

    return fn


def reward_for(spec: str, tokenizer: Any) -> RewardFn:
    if spec.startswith("rule:"):
        return rule_reward(spec[5:], tokenizer)
    folder = Path(spec)
    if not folder.is_dir():
        raise SystemExit(
            f"error: --reward-model {spec}: no such folder; pass a reward-model run or rule:NAME"
        )
    return model_reward(folder)


# ---------------------------------------------------------------- the loop


def snapshot_prompts(rows: list[dict[str, Any]], snapshot: Path) -> list[list[dict]]:
    seen: dict[str, list[dict]] = {}
    for row in rows:
        prompt = row.get("prompt") or (row["messages"][:-1] if "messages" in row else None)
        if not prompt:
            raise SystemExit(f"error: --snapshot {snapshot}: rows need a prompt (or messages) column for PPO")
        seen.setdefault(json.dumps(prompt, sort_keys=True), prompt)
    return list(seen.values())


def forward(
    model: Any, head: nn.Module, ids: torch.Tensor, attn: torch.Tensor, n_prompt: int, temperature: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per response token: log-prob at the sampling temperature, value, and entropy."""
    positions = (attn.cumsum(-1) - 1).clamp(
        min=0
    )  # left padding: positions start at each prompt's first token
    out = model(input_ids=ids, attention_mask=attn, position_ids=positions, output_hidden_states=True)
    logits = out.logits[:, n_prompt - 1 : -1].float() / temperature
    logp_all = torch.log_softmax(logits, -1)
    logp = logp_all.gather(-1, ids[:, n_prompt:, None])[..., 0]
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    values = head(out.hidden_states[-1][:, n_prompt - 1 : -1].float())[..., 0]
    return logp, values, entropy


class PolicyAndValue(nn.Module):
    """The policy and its value head as one module: what accelerate wraps for data parallelism, so
    that one backward reduces the gradients of both."""

    def __init__(self, policy: Any, head: nn.Module):
        super().__init__()
        self.policy, self.head = policy, head

    def forward(
        self, ids: torch.Tensor, attn: torch.Tensor, n_prompt: int, temperature: float
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return forward(self.policy, self.head, ids, attn, n_prompt, temperature)


class Ranks:
    """Statistics over the whole batch when each rank holds a share of it. With one process every
    method returns the local values unchanged, so a single process computes what it always did."""

    def __init__(self, accelerator: Any):
        self.accelerator = accelerator
        self.world, self.rank = accelerator.num_processes, accelerator.process_index

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank's rows of `x`, concatenated in rank order."""
        return self.accelerator.gather(x.contiguous()) if self.world > 1 else x

    def whiten(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """`masked_whiten` with the mean and variance of every rank's real tokens."""
        if self.world == 1:
            return masked_whiten(x, mask)
        sums = self.accelerator.reduce(torch.stack([(x * mask).sum(), mask.sum()]), "sum")
        count = sums[1].clamp(min=1)
        mean = sums[0] / count
        var = self.accelerator.reduce(((x - mean) ** 2 * mask).sum(), "sum") / count
        return (x - mean) * torch.rsqrt(var + 1e-8) * mask

    def mean(self, values: dict[str, float]) -> dict[str, float]:
        """Each value averaged over the ranks."""
        if self.world == 1:
            return values
        keys = sorted(values)
        local = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=self.accelerator.device)
        averaged = self.accelerator.reduce(local, "mean")
        return {k: float(v) for k, v in zip(keys, averaged.tolist(), strict=True)}


class _Both:
    """Policy and value head seen as one set of named parameters (for the moved-parameters check)."""

    def __init__(self, policy: Any, head: dict[str, torch.Tensor]):
        self.policy, self.head = policy, head

    def named_parameters(self) -> Any:
        yield from self.policy.named_parameters()
        yield from self.head.items()


def train_ppo(
    args: argparse.Namespace,
    config: PPOStageConfig,
    reward: RewardFn | None = None,
    report: Callable[[dict], None] | None = None,
) -> dict[str, Any]:
    from accelerate import Accelerator
    from peft import get_peft_model
    from transformers import GenerationConfig

    cfg: PPOSettings = config.ppo
    # one process: no distributed state, and the loop below computes exactly what it always did
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    ranks = Ranks(accelerator)
    try:
        cfg.check_processes(ranks.world)
    except ConfigError as exc:
        fail(str(exc))
    local_batch, local_mini = cfg.batch_size // ranks.world, cfg.mini_batch_size // ranks.world
    group = cfg.samples_per_prompt
    device = accelerator.device
    seed_everything(config.seed)
    rows = read_snapshot(args.snapshot)
    prompts = snapshot_prompts(rows, args.snapshot)
    tokenizer = load_tokenizer(args.parent)
    tokenizer.padding_side = "left"
    reward = reward or reward_for(args.reward_model, tokenizer)
    policy = get_peft_model(
        load_model(args.parent, settings=config.model), lora_config(config.lora, "CAUSAL_LM")
    )
    policy.eval()  # no dropout anywhere: log-probs must be the same function in rollout and update
    head = nn.Linear(policy.config.hidden_size, 1)
    nn.init.zeros_(head.weight)  # values start at 0 (Huang et al. 2024)
    nn.init.zeros_(head.bias)
    # DDP (more than one process) starts every rank from rank 0's weights; `policy` and `head`
    # stay the plain modules for sampling and the no-grad passes
    model = accelerator.prepare(PolicyAndValue(policy, head))
    if ranks.rank:  # each rank samples its own rollouts; rank 0 keeps the seed's stream
        torch.manual_seed(config.seed + ranks.rank)
    params = [p for p in policy.parameters() if p.requires_grad] + list(head.parameters())
    before_training = {
        **trainable_copy(policy),
        **{f"value_head.{k}": v.detach().clone() for k, v in head.named_parameters()},
    }
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, eps=1e-5)
    kl_ctl = (
        AdaptiveKL(cfg.kl_coef, cfg.target_kl, cfg.kl_horizon) if cfg.adaptive_kl else FixedKL(cfg.kl_coef)
    )
    moments = RunningMoments()
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    generation = GenerationConfig(
        do_sample=True,
        temperature=cfg.temperature,
        top_k=0,
        top_p=1.0,
        max_new_tokens=cfg.max_new_tokens,
        eos_token_id=eos,
        pad_token_id=pad,
    )
    reporter = Reporter(args.output, "ppo", cfg.iterations)
    order: list[int] = []
    history: list[dict[str, float]] = []
    for iteration in range(1, cfg.iterations + 1):
        # 1. rollout (timed apart: on a CPU it dominates, see benchmarks/training.py)
        t0 = time.perf_counter()
        batch = []
        for _ in range(cfg.batch_size // group):  # the same global batch on every rank (same seed)...
            if not order:
                order = random.sample(range(len(prompts)), len(prompts))
            batch.extend([prompts[order.pop()]] * group)  # a prompt's answers side by side
        batch = batch[ranks.rank * local_batch : (ranks.rank + 1) * local_batch]  # ...and this rank's share
        texts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in batch]
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        n_prompt = enc["input_ids"].shape[1]
        with torch.no_grad():
            out = policy.generate(**enc, generation_config=generation)
        response = out[:, n_prompt:]
        if response.shape[1] < cfg.max_new_tokens:  # generate stops early once every row has ended
            response = nn.functional.pad(response, (0, cfg.max_new_tokens - response.shape[1]), value=pad)
        mask = response_mask(response, eos)
        lengths = mask.sum(-1).long()
        ended = ((response == eos) & mask.bool()).any(-1)
        decoded = [
            tokenizer.decode(r[:n], skip_special_tokens=True) for r, n in zip(response, lengths, strict=True)
        ]
        t_rollout = time.perf_counter() - t0
        # 2. score
        raw = torch.tensor(reward(batch, decoded, lengths.tolist()), dtype=torch.float32, device=device)
        scores = raw.clone()
        if cfg.missing_eos_penalty is not None:
            scores = scores - cfg.missing_eos_penalty * (~ended).float()
        if group > 1:
            scores = leave_one_out(scores, group)
        if cfg.normalize_scores:
            moments.update(ranks.gather(scores))  # the running moments of the whole batch
            scores = moments.normalise(scores)
        ids = torch.cat([enc["input_ids"], response], 1)
        attn = torch.cat([enc["attention_mask"], mask.long()], 1)
        # 3-4. old log-probs, reference log-probs (adapter off), values
        with torch.no_grad():
            old_logp, old_values, _ = forward(policy, head, ids, attn, n_prompt, cfg.temperature)
            with policy.disable_adapter():
                ref_logp, _, _ = forward(policy, head, ids, attn, n_prompt, cfg.temperature)
        old_values = old_values * mask
        # 5. per-token reward: -beta * KL everywhere, the score at the last real token
        kl = kl_per_token(old_logp, ref_logp, cfg.kl_estimator) * mask
        rewards = -kl_ctl.beta * kl
        last = (lengths - 1).clamp(min=0)
        rewards[torch.arange(len(batch), device=device), last] += scores
        # 6. GAE, whitened advantages (over the whole batch)
        advantages, returns = gae(rewards, old_values, mask, cfg.gamma, cfg.lam)
        advantages = ranks.whiten(advantages, mask)
        t_optimise = time.perf_counter()
        # 7. optimise
        stats: dict[str, list[float]] = {
            k: [] for k in ("policy_loss", "value_loss", "clipfrac", "vf_clipfrac", "approx_kl", "entropy")
        }
        for _ in range(cfg.epochs):
            for mb in torch.randperm(len(batch)).split(local_mini):
                # through the prepared module: with several processes its backward averages the
                # gradients over the ranks
                logp, values, entropy = model(ids[mb], attn[mb], n_prompt, cfg.temperature)
                m = mask[mb]
                pg, clipfrac = policy_loss(logp, old_logp[mb], advantages[mb], m, cfg.cliprange)
                vf, vf_clipfrac = value_loss(values, old_values[mb], returns[mb], m, cfg.cliprange_value)
                loss = pg + cfg.vf_coef * vf
                optimizer.zero_grad()
                accelerator.backward(loss)
                nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                optimizer.step()
                with torch.no_grad():
                    stats["policy_loss"].append(pg.item())
                    stats["value_loss"].append(vf.item())
                    stats["clipfrac"].append(clipfrac.item())
                    stats["vf_clipfrac"].append(vf_clipfrac.item())
                    stats["approx_kl"].append(masked_mean(0.5 * (logp - old_logp[mb]) ** 2, m).item())
                    stats["entropy"].append(masked_mean(entropy, m).item())
        t_optimise = time.perf_counter() - t_optimise
        # 8. KL control, on the mean summed KL of a response over the whole batch
        seq_kl = ranks.gather(kl.sum(-1)).mean().item()
        beta_used = kl_ctl.beta
        kl_ctl.update(seq_kl, cfg.batch_size)
        residual = (returns - old_values)[mask.bool()]
        explained = 1 - residual.var().item() / max(returns[mask.bool()].var().item(), 1e-8)
        row = {
            "reward": ranks.gather(raw).mean().item(),
            # with a leave-one-out baseline the mean is 0 by construction: its spread is the signal
            "score": ranks.gather(scores).mean().item(),
            "score_std": ranks.gather(scores).std().item() if cfg.batch_size > 1 else 0.0,
            "kl": seq_kl,
            "beta": beta_used,
            "response_length": ranks.gather(lengths.float()).mean().item(),
            "eos_share": ranks.gather(ended.float()).mean().item(),
            # the ranks' own optimisation statistics and times, averaged over the ranks
            **ranks.mean(
                {
                    "explained_variance": explained,
                    "time_rollout": t_rollout,
                    "time_optimise": t_optimise,
                    **{k: sum(v) / len(v) for k, v in stats.items()},
                }
            ),
        }
        history.append(row)
        reporter.step(iteration, **row)
        if report:
            report(row)
    head_now = {f"value_head.{k}": v for k, v in head.named_parameters()}
    moved = moved_report(_Both(policy, head_now), before_training)
    if ranks.world > 1:
        # the gradients were averaged, so every rank must hold the same weights: check it (cheap)
        sums = ranks.gather(torch.stack([p.detach().double().sum() for p in params])[None])
        moved["ranks_in_sync"] = bool((sums == sums[0]).all())
    if not is_main():  # rank 0 writes the adapter, the value head and meta.json
        return {**moved, "history": history}
    args.output.mkdir(parents=True, exist_ok=True)
    saved = save_policy_adapter(policy, args.parent, args.output)
    from safetensors.torch import save_file

    save_file(
        {k: v.detach().contiguous() for k, v in head.state_dict().items()},
        args.output / "value_head.safetensors",
    )
    first, final = history[0], history[-1]
    metrics = {
        "iterations": cfg.iterations,
        "prompts": len(prompts),
        "reward_first": first["reward"],
        "reward_last": final["reward"],
        "kl_last": final["kl"],
        "beta_last": kl_ctl.beta,
        "response_length_first": first["response_length"],
        "response_length_last": final["response_length"],
        **moved,
    }
    reporter.emit("end", step=cfg.iterations, **metrics)
    write_meta(
        args.output,
        "ppo",
        args,
        config,
        rows,
        metrics,
        {"kind": "lora", "reward_model": str(args.reward_model), **saved},
    )
    return {**metrics, "history": history}


if __name__ == "__main__":
    run_main("ppo", lambda args, config: train_ppo(args, config))
