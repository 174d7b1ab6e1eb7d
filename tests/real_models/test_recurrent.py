"""Recurrent models as people write them: packed LSTMs, GRUs, and cells unrolled by hand."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from tests.real_models.training import train


class PackedLSTMClassifier(nn.Module):
    """Embedding (padding index 0) -> 2-layer bidirectional LSTM over packed sequences -> head."""

    def __init__(self, vocab: int = 50, dim: int = 16, hidden: int = 24) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim, padding_idx=0)
        self.lstm = nn.LSTM(dim, hidden, num_layers=2, batch_first=True, bidirectional=True)
        self.fc = nn.Linear(2 * hidden, 2)

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        packed = pack_padded_sequence(self.emb(tokens), lengths, batch_first=True,
                                      enforce_sorted=False)
        _, (h, _) = self.lstm(packed)
        return self.fc(torch.cat([h[-2], h[-1]], dim=1))


class GRURegressor(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gru = nn.GRU(1, 16, batch_first=True)
        self.head = nn.Linear(16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.gru(x)
        return self.head(out[:, -1])


def _token_batches(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Variable-length token sequences (padded with 0); the label: whether token 1 occurs."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 20, (256,), generator=g)
    tokens = torch.randint(2, 50, (256, 20), generator=g)
    tokens[torch.arange(20) >= lengths[:, None]] = 0
    labels = torch.randint(0, 2, (256,), generator=g)
    first = torch.randint(0, 3, (256,), generator=g)  # position of the marker token
    tokens[labels == 1, first[labels == 1]] = 1
    return tokens, lengths, labels


def test_a_packed_bidirectional_lstm_trains_without_findings_and_with_exact_norms() -> None:
    torch.manual_seed(0)
    model = PackedLSTMClassifier()
    tokens, lengths, labels = _token_batches()

    def loss(step: int) -> torch.Tensor:
        batch = slice(32 * (step % 8), 32 * (step % 8) + 32)
        return F.cross_entropy(model(tokens[batch], lengths[batch]), labels[batch])

    run = train(model, loss, 60, lr=3e-3)
    assert run.kinds() == []  # no no_gradient for the padding row, no stalled, nothing
    assert run.assert_norms_match_reference(rtol=1e-5) == 60 * 3
    assert run.monitor.records[0].layers == ["emb", "lstm", "fc"]  # both LSTM layers are one


def test_a_gru_regressor_trains_without_findings_and_with_exact_norms() -> None:
    torch.manual_seed(0)
    model = GRURegressor()
    t = torch.linspace(0, 6.28, 24)
    phase = torch.rand(128, 1) * 6.28
    x = torch.sin(t[None, :] + phase)[..., None]
    y = torch.sin(t[-1] + 0.26 + phase)

    def loss(step: int) -> torch.Tensor:
        batch = slice(32 * (step % 4), 32 * (step % 4) + 32)
        return F.mse_loss(model(x[batch]), y[batch])

    run = train(model, loss, 60, lr=1e-2)
    assert run.kinds() == []
    assert run.assert_norms_match_reference(rtol=1e-5) == 60 * 2
