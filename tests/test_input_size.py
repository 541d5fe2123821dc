"""A model's input size changed within a run (training stages, CLIPA): the image position embedding
interpolated exactly as open_clip interpolates it when it loads weights at another size, the text positions
cut or extended, and the optimizer state and the EMA carried over to the new parameters."""

from __future__ import annotations

import pytest
import torch

from clipscale.config import ModelConfig
from clipscale.model import create_model, open_clip, transforms_for
from clipscale.model.input_size import check_sizes, context_length, image_size, resize_inputs


@pytest.mark.parametrize("name, size", [("ViT-B-16", 112), ("ViT-B-32", 288)])  # CLIPA's 224 -> 112; and up
def test_the_position_embedding_is_interpolated_as_open_clip_loads_it(tmp_path, name, size):
    torch.manual_seed(0)
    reference = open_clip.create_model(name).eval()
    with torch.no_grad():  # a position table unlike the init's (a trained one is not smooth either)
        reference.visual.positional_embedding.normal_()
    path = tmp_path / "weights.pt"
    torch.save({"state_dict": reference.state_dict()}, path)
    # open_clip's own loader at the other size: it calls resize_pos_embed (bicubic, antialiased) on load
    expected = open_clip.create_model(name, pretrained=str(path), force_image_size=size).eval()
    assert expected.visual.positional_embedding.shape[0] == 1 + (size // expected.visual.patch_size[0]) ** 2

    assert resize_inputs(reference, image=size) == ["visual.positional_embedding"]
    assert image_size(reference) == size
    assert torch.equal(reference.visual.positional_embedding, expected.visual.positional_embedding)
    images = torch.randn(2, 3, size, size)
    with torch.no_grad():  # the resized model is open_clip's model at that size, output for output
        assert torch.equal(reference.encode_image(images), expected.encode_image(images))
    assert transforms_for(reference)[1].transforms[0].size == size  # evaluation crops follow


def tiny():
    torch.manual_seed(0)
    bundle = create_model(ModelConfig(name="clip-tiny", precision="fp32"))
    return bundle.model, bundle.tokenizer


def train_steps(model, optimizer, size, tokens, n=2):
    for _ in range(n):
        out = model(image=torch.randn(4, 3, size, size), text=torch.randint(1, 400, (4, tokens)))
        loss = (out["image_features"] @ out["text_features"].T).diagonal().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def test_text_positions_are_cut_and_extended_with_their_optimizer_state():
    model, tokenizer = tiny()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    train_steps(model, optimizer, 32, 32)
    before = model.positional_embedding.detach().clone()
    moments = {k: v.clone() for k, v in optimizer.state[model.positional_embedding].items()}

    assert resize_inputs(model, context=8, optimizer=optimizer) == ["positional_embedding"]
    assert context_length(model) == model.context_length == 8 and model.attn_mask.shape == (8, 8)
    assert torch.equal(model.positional_embedding, before[:8])  # the first positions, as trained
    state = optimizer.state[model.positional_embedding]
    assert torch.equal(state["exp_avg"], moments["exp_avg"][:8])
    assert torch.equal(state["exp_avg_sq"], moments["exp_avg_sq"][:8]) and state["step"] == moments["step"]
    params = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert all(id(p) in params for p in model.parameters())  # the new Parameter trains, the old one is gone
    train_steps(model, optimizer, 32, 8)
    trained = model.positional_embedding.detach().clone()

    resize_inputs(model, context=20, optimizer=optimizer, seed=3)
    grown = model.positional_embedding.detach()
    assert grown.shape == (20, 64) and torch.equal(grown[:8], trained)
    new = grown[8:]
    assert 0.005 < new.std().item() < 0.02  # open_clip's init of text positions: normal, std 0.01
    assert optimizer.state[model.positional_embedding]["exp_avg"][8:].abs().sum() == 0  # no history yet
    model.eval()
    with torch.no_grad():  # the tokenizer at the new length feeds it
        features = model.encode_text(tokenizer(["a red square"], context_length=20))
    assert features.shape == (1, 64) and torch.isfinite(features).all()
    again, _ = tiny()
    resize_inputs(again, context=8)
    resize_inputs(again, context=20, seed=3)
    assert torch.equal(again.positional_embedding[8:], new)  # drawn from the seed: the same on every rank


def test_image_moments_follow_the_interpolation_and_stay_non_negative():
    model, _ = tiny()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    train_steps(model, optimizer, 32, 32)
    old = optimizer.state[model.visual.positional_embedding]
    resize_inputs(model, image=16, optimizer=optimizer)
    state = optimizer.state[model.visual.positional_embedding]
    assert state["exp_avg"].shape == state["exp_avg_sq"].shape == (1 + 2 * 2, 96)
    assert (state["exp_avg_sq"] >= 0).all() and state["exp_avg_sq"].sum() > 0
    assert torch.equal(state["exp_avg"][0], old["exp_avg"][0])  # the class token's row is kept as it is
    before = model.visual.positional_embedding.detach().clone()
    train_steps(model, optimizer, 16, 32)
    assert not torch.equal(model.visual.positional_embedding, before)  # it trains at the new size


def test_the_ema_follows_the_resized_parameters():
    from clipscale.engine.ema import ModelEMA

    model, _ = tiny()
    ema = ModelEMA(model, decay=0.9, warmup=False)
    resize_inputs(model, image=16, context=8, ema=ema)
    shadow = ema.shadow["visual.positional_embedding"].clone()
    assert shadow.shape == (5, 96) and ema.shadow["positional_embedding"].shape == (8, 64)
    assert torch.equal(shadow, model.visual.positional_embedding)  # the same map on the same weights
    with torch.no_grad():
        model.visual.positional_embedding.add_(1.0)
    ema.update(1)  # averages the new parameter (not the old one, which is gone)
    assert torch.allclose(ema.shadow["visual.positional_embedding"], shadow + 0.1, atol=1e-6)


@pytest.mark.parametrize(
    "name, images, texts, reason",
    [
        ("clip-tiny", {20}, set(), "image_size 20 is not a multiple of the patch size 8"),
        ("RN50", {112}, set(), "ModifiedResNet has no position grid to interpolate"),
        ("clip-tiny", {16, 24}, {8, 77}, None),
    ],
)
def test_sizes_a_model_cannot_take_are_one_line_reasons(name, images, texts, reason):
    model = open_clip.create_model(name) if name != "clip-tiny" else tiny()[0]
    got = check_sizes(model, images, texts)
    assert got == reason if reason is None else reason in got and "\n" not in got
