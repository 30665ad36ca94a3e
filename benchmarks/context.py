"""How much of its context a trained model uses: held-out loss by position, and in-context copying.

    python benchmarks/context.py RUN/pretrain --shards RUN/shards

Four measurements on a checkpoint, in nats per token:
1. the held-out split cut into windows of the model's context, the loss by position in the window:
   a model that draws on a longer context predicts later positions better;
2. spans of random tokens, and spans of held-out text, each repeated: a model that copies from its
   context (an "induction head", Olsson et al. 2022, "In-context learning and induction heads")
   predicts the second copy far better than the first;
3. the held-out tokens whose preceding k tokens already occurred earlier in the window: the share
   that an exact copying rule (A B ... A -> B) would have predicted, and the model's loss on them;
4. what copying could gain on the text: the held-out loss of the model's distribution mixed with
   weight lambda into the copying rule's (the tokens that followed the same k tokens earlier in the
   window, by count), where the rule has any: a cache model in the manner of Grave et al. 2017,
   "Improving neural language models with a continuous cache", on token n-grams.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from tinylm.checkpoint import load_checkpoint
from tinylm.shards import load_split
from tinylm.tokenizer import SPECIAL_TOKENS


@torch.no_grad()
def log_probs(model, windows: torch.Tensor) -> torch.Tensor:
    """windows (N, T + 1) token ids -> (N, T, V) the model's log-probabilities of each next token."""
    return torch.cat([torch.log_softmax(model(rows[:, :-1])[0].float(), -1) for rows in windows.split(16)])


def token_losses(model, windows: torch.Tensor) -> torch.Tensor:
    """windows (N, T + 1) token ids -> (N, T) losses of predicting each next token, nats."""
    return -log_probs(model, windows).gather(-1, windows[:, 1:, None])[..., 0]


def earlier_followers(row: np.ndarray, k: int):
    """For each target t of a window row (T + 1 ids), the tokens that followed row[t-k+1 : t+1] earlier
    in the row, oldest first: yields (t, list), the list empty where those k tokens are new (or t < k - 1)."""
    followers: dict[tuple, list] = {}
    for t in range(len(row) - 1):  # predicting row[t + 1] from row[t - k + 1 : t + 1]
        if t < k - 1:
            yield t, []
            continue
        key = tuple(row[t - k + 1:t + 1])
        yield t, list(followers.get(key, ()))
        followers.setdefault(key, []).append(row[t + 1])


def copy_rule(windows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """For (N, T + 1) windows: (seen, right), each (N, T): the k tokens before target t occurred
    earlier in the window, and one of the tokens that followed them there is the target."""
    N, T1 = windows.shape
    seen, right = np.zeros((N, T1 - 1), bool), np.zeros((N, T1 - 1), bool)
    for w, row in enumerate(windows):
        for t, before in earlier_followers(row, k):
            seen[w, t], right[w, t] = bool(before), row[t + 1] in before
    return seen, right


def copy_mixture_loss(log_probs: np.ndarray, windows: np.ndarray, k: int, lam: float) -> float:
    """Mean loss, nats per token, of (1 - lam) * model + lam * copying rule, where the rule applies.

    log_probs (N, T, V): the model's log-probabilities of the next token; windows (N, T + 1) ids.
    The rule's distribution at t: the tokens that followed row[t-k+1 : t+1] earlier in the window,
    in proportion to how often."""
    N, T, _ = log_probs.shape
    total = 0.0
    for w, row in enumerate(windows):
        for t, before in earlier_followers(row, k):
            p = np.exp(log_probs[w, t, row[t + 1]])
            if before:
                p = (1 - lam) * p + lam * before.count(row[t + 1]) / len(before)
            total -= np.log(p)
    return total / (N * T)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", help="a checkpoint folder, or a run's pretrain folder")
    ap.add_argument("--shards", required=True, help="the shard folder whose held-out split is measured")
    ap.add_argument("--span", type=int, default=64, help="tokens in each repeated span")
    args = ap.parse_args()
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    model, _, _ = load_checkpoint(args.checkpoint)
    model.eval()
    T = model.cfg.max_seq_len
    arrays, info = load_split(args.shards, "val")
    val = np.concatenate([np.asarray(a, dtype=np.int64) for a in arrays])
    bytes_per_token = info["bytes"] / info["tokens"]
    n = (len(val) - 1) // T
    windows = np.stack([val[i * T:i * T + T + 1] for i in range(n)])  # (n, T + 1)
    lp = log_probs(model, torch.from_numpy(windows))
    losses = -np.take_along_axis(lp.numpy(), windows[:, 1:, None], -1)[..., 0]  # (n, T), as token_losses
    edges = [0, 8, 32, 64, 128, T]
    print(f"held-out, {n} windows of {T}: {losses.mean():.3f} nats/token; by position in the window:")
    print("  " + ", ".join(f"{a}-{b}: {losses[:, a:b].mean():.3f}" for a, b in zip(edges, edges[1:]) if a < b <= T))

    span = min(args.span, (T + 1) // 2)
    random_spans = rng.integers(len(SPECIAL_TOKENS), model.cfg.vocab_size, size=(32, span))  # no special tokens
    text_spans = np.stack([val[s:s + span] for s in rng.integers(0, len(val) - span, size=32)])
    for name, spans in (("random tokens", random_spans), ("held-out text", text_spans)):
        l = token_losses(model, torch.from_numpy(np.tile(spans, 2))).numpy()
        print(f"{name}, {span}-token spans repeated: first copy {l[:, :span - 1].mean():.3f}, "
              f"second copy {l[:, span:].mean():.3f} nats/token")

    for k in (1, 2, 3):
        seen, right = copy_rule(windows, k)
        print(f"the {k} tokens before the target seen earlier in the window: {seen.mean():.1%} of targets; the copying "
              f"rule right on {right.mean():.1%} (model's loss there {losses[right].mean():.3f}), wrong on "
              f"{(seen & ~right).mean():.1%} ({losses[seen & ~right].mean():.3f}); never seen {losses[~seen].mean():.3f}")

    for lam in (0.1, 0.2, 0.3):
        mixed = copy_mixture_loss(lp.numpy(), windows, 2, lam)
        gain = losses.mean() - mixed
        print(f"the model mixed with the copying rule on 2 tokens, lambda {lam}: {mixed:.3f} nats/token, "
              f"{gain:.3f} less = {gain / np.log(2) / bytes_per_token:.3f} bits/byte")


if __name__ == "__main__":
    main()
