"""One federated round with pretrained encoders from local files: a tiny timm ResNet (fixed,
cached features) and a tiny BERT with LoRA adapters, both checked by SHA-256 at the server and at
every site, under DP-SGD and SecAgg+. The real ServerApp and ClientApp run over the in-process
grid (tests/cli/test_readme.py does the same to keep Ray's start-up out of the budget)."""

from __future__ import annotations

import hashlib
import json

import flwr.simulation
import pytest
import torch
from flwr.app import Context, RecordDict

from fedfuse.common.config import RunConfig
from fedfuse.common.data.synthetic import generate
from fedfuse.common.models import build_model
from fedfuse.common.models.pretrained import fixed_state_keys, weights_sha256, wire_state
from fedfuse.common.secagg import masking
from fedfuse.common.secagg.protocol import MASKED_ARRAY, MASKED_KEY
from fedfuse.simulations import runner
from fedfuse.simulations.inprocess import InProcessGrid
from fedfuse.simulations.runner import simulate

transformers = pytest.importorskip("transformers", reason="the 'transfer' extra is not installed")


GRIDS: list[InProcessGrid] = []


def _in_process(*, server_app, client_app, num_supernodes, **_: object) -> None:
    grid = InProcessGrid(client_app, num_supernodes)
    GRIDS.append(grid)
    server_app(
        grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})
    )


def _tiny_bert(folder) -> None:
    words = ["fever", "cough", "no", "denies", "patient", "chest", "pain", "normal"]
    (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]",
                                                 *words]) + "\n")  # fmt: skip
    config = transformers.BertConfig(
        vocab_size=len(words) + 5, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=32,
    )  # fmt: skip
    transformers.BertModel(config).save_pretrained(folder)
    transformers.BertTokenizer(str(folder / "vocab.txt")).save_pretrained(folder)


@pytest.mark.e2e
def test_a_federated_round_with_pretrained_encoders(tmp_path, monkeypatch):
    generate(tmp_path / "data", sites=2, records=48, seed=4, image_size=32)
    timm = pytest.importorskip("timm")
    torch.save(timm.create_model("test_resnet").state_dict(), tmp_path / "timm.pt")
    (tmp_path / "bert").mkdir()
    _tiny_bert(tmp_path / "bert")
    cfg = RunConfig(
        data_dir=str(tmp_path / "data"),
        out_dir=str(tmp_path / "runs"),
        run_name="transfer",
        num_rounds=1,
        local_epochs=1,
        batch_size=16,
        image_size=32,
        max_tokens=16,
        image_encoder="timm:test_resnet",
        image_weights=str(tmp_path / "timm.pt"),
        image_weights_sha256=hashlib.sha256((tmp_path / "timm.pt").read_bytes()).hexdigest(),
        image_freeze="all",
        image_norm="frozen",
        text_encoder="bert",
        text_weights=str(tmp_path / "bert"),
        text_weights_sha256=weights_sha256(tmp_path / "bert"),
        text_lora_rank=2,
        target_epsilon=8.0,
    )
    monkeypatch.setattr(flwr.simulation, "run_simulation", _in_process)
    monkeypatch.setattr(runner, "run_simulation", _in_process)  # the runner's own import
    run_dir = simulate(cfg, num_sites=2)
    (round1,) = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert set(round1["sites"]) == {"site-0", "site-1"}, round1
    assert 0 <= round1["eval-auroc"] <= 1
    privacy = json.loads((run_dir / "privacy.json").read_text())
    for s in privacy["sites"].values():
        assert 0 < float(s["epsilon"]) <= 8.0
    state = torch.load(run_dir / "model.pt", weights_only=True)
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    ref = torch.load(tmp_path / "timm.pt", weights_only=True)
    # The fixed encoder came back from the round exactly as the weights file holds it.
    stem = next(k for k in ref if k.endswith("conv1.weight") or k.endswith("conv.weight"))
    assert torch.equal(state[f"encoders.image.net.{stem}"], ref[stem])
    assert any("lora_A" in k for k in state)

    # The fixed backbones (frozen, from the checked files) never travel: each site's masked
    # update holds exactly the entries that train (and the frozen, randomly started projection).
    model = build_model(cfg)
    wire = {k: v.numpy() for k, v in wire_state(model, cfg).items()}
    fixed = fixed_state_keys(model, cfg)
    assert not any(k.startswith("encoders.image.net.") for k in wire)
    assert any("lora_A" in k for k in wire) and not any(".bert." in k and "lora_" not in k
                                                        for k in wire)  # fmt: skip
    assert fixed and set(state) == set(wire) | fixed  # model.pt: the whole model
    vectors = [
        m.content.array_records[MASKED_KEY][MASKED_ARRAY].numpy()
        for m in GRIDS[-1].received
        if m.metadata.message_type == "train" and MASKED_KEY in m.content.array_records
    ]
    assert len(vectors) == 2
    assert all(v.size == masking.vector_length(wire) for v in vectors)
    full = masking.vector_length({k: v.numpy() for k, v in model.state_dict().items()})
    assert masking.vector_length(wire) < full / 2, (masking.vector_length(wire), full)

    # A site whose copy of the weights differs refuses; the run says so and names no path.
    bad = cfg.replace(run_name="bad", image_weights_sha256="0" * 64)
    with pytest.raises(Exception) as refused:
        simulate(bad, num_sites=2)
    assert "SHA-256" in str(refused.value) and str(tmp_path) not in str(refused.value)
