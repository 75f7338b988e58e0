"""How close the sampled prediction metrics are to the exact ones: ``XGradCallback(metrics_max_bytes=...)`` below the
size of the predicted parameters.

Trains a small character-level GPT (4 pre-norm layers, width 256, 3.2M parameters in 54 tensors) with AdamW and
XGrad (s = 1) on random tokens for ``--steps`` steps. At every predicted step it holds W_hat once per budget (what the
callback does on a logging step, through the same ``HeldPrediction``) and compares each sampled cosine and error with
the exact values from float64 copies of W, W_hat and W_next. Prints the worst deviation per budget; writes nothing.

    python benchmarks/sampled_metrics.py           # about 20 s on a 2-core CPU
"""

from __future__ import annotations

import argparse

import torch
from torch import Tensor, nn

from lightning_xgrad import OptimizerPredictor
from lightning_xgrad.prediction.quality import HeldPrediction

VOCAB, WIDTH, LAYERS, CONTEXT = 96, 256, 4, 64


class TinyGPT(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(VOCAB, WIDTH)
        self.position = nn.Parameter(torch.zeros(CONTEXT, WIDTH))
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(WIDTH, 4, 4 * WIDTH, dropout=0.0, batch_first=True, norm_first=True)
            for _ in range(LAYERS)
        )
        self.norm = nn.LayerNorm(WIDTH)
        self.head = nn.Linear(WIDTH, VOCAB)

    def forward(self, tokens: Tensor) -> Tensor:
        hidden = self.embedding(tokens) + self.position[: tokens.shape[1]]
        mask = nn.Transformer.generate_square_subsequent_mask(tokens.shape[1])
        for block in self.blocks:
            hidden = block(hidden, src_mask=mask, is_causal=True)
        return self.head(self.norm(hidden))


def flat(tensors: list[Tensor]) -> Tensor:
    return torch.cat([t.detach().double().flatten() for t in tensors])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    torch.manual_seed(0)
    net = TinyGPT()
    optimizer = torch.optim.AdamW(net.parameters(), lr=3e-3)
    predictor = OptimizerPredictor(optimizer)
    text = torch.randint(0, VOCAB, (4000,))
    total = sum(p.numel() * p.element_size() for p in net.parameters())
    budgets = {"1/8": total // 8, "1/64": total // 64, "256 KiB": 2**18}
    worst = {name: [0.0, 0.0] for name in budgets}
    params = list(net.parameters())
    print(f"{sum(p.numel() for p in params)} parameters, {total} bytes, {len(params)} tensors")
    for _ in range(args.steps):
        starts = torch.randint(0, len(text) - CONTEXT - 1, (16,))
        inputs = torch.stack([text[i : i + CONTEXT] for i in starts])
        targets = torch.stack([text[i + 1 : i + CONTEXT + 1] for i in starts])
        predictor.predict()
        predicted = predictor.predicted_params()
        held = {name: HeldPrediction(predicted, budget) for name, budget in budgets.items()} if predicted else {}
        w = flat([real for _, _, real in predicted]) if predicted else None
        w_hat = flat([local for _, local, _ in predicted]) if predicted else None
        optimizer.zero_grad()
        nn.functional.cross_entropy(net(inputs).flatten(0, 1), targets.flatten()).backward()
        predictor.restore()
        optimizer.step()
        if w is None or w_hat is None:
            continue
        d, u = w_hat - w, flat(list(net.parameters())) - w
        cosine, error = float(d @ u / (d.norm() * u.norm())), float((d - u).norm() / u.norm())
        for name, sample in held.items():
            assert sample.nbytes <= budgets[name]
            quality = sample.compare(1)
            assert quality is not None
            worst[name][0] = max(worst[name][0], abs(quality.cosine - cosine))
            worst[name][1] = max(worst[name][1], abs(quality.error / error - 1))
    for name, (cosine_deviation, error_deviation) in worst.items():
        print(
            f"budget {name} of the copy ({budgets[name]} bytes): worst |cosine - exact| {cosine_deviation:.4f}, "
            f"worst |error / exact - 1| {error_deviation:.4f}"
        )


if __name__ == "__main__":
    main()
