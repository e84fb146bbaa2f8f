"""Token-labelling loss, MixToken alignment and the attention similarity penalty."""

import math
import random

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from refiner_pl.data.token_label import (
    TokenLabelImageFolder,
    build_token_label_transform,
    label_map_path,
    save_label_map,
)
from refiner_pl.errors import UserInputError
from refiner_pl.losses import TokenLabelLoss, attention_similarity_penalty
from refiner_pl.models.refiner_vit import AttentionMaps, RefinerViT, TokenLabelOutput
from refiner_pl.token_labelling import TokenLabelMixup, dense_label_targets


def soft_ce(logits: list[float], target: list[float]) -> float:
    """-sum_c t_c log softmax(z)_c, written out."""
    log_sum = math.log(sum(math.exp(z) for z in logits))
    return sum(t * (log_sum - z) for z, t in zip(logits, target, strict=True))


CLS = [[1.0, 2.0, 0.0], [0.0, 0.0, 3.0]]
AUX = [[[0.0, 1.0, 0.0], [2.0, 0.0, 0.0]], [[1.0, 1.0, 1.0], [0.0, 0.0, -1.0]]]
DENSE = [[[0.0, 1.0, 0.0], [0.5, 0.5, 0.0]], [[1 / 3] * 3, [0.0, 0.0, 1.0]]]


def _output(box: tuple[int, int, int, int] | None = None, lam: float = 1.0) -> TokenLabelOutput:
    return TokenLabelOutput(torch.tensor(CLS), torch.tensor(AUX), box, lam)


def test_loss_equals_hand_computation():
    pairs = [(z, t) for b in range(2) for z, t in zip(AUX[b], DENSE[b], strict=True)]
    dense_ce = sum(soft_ce(z, t) for z, t in pairs) / 4
    cls_ce = (soft_ce(CLS[0], [0, 1, 0]) + soft_ce(CLS[1], [0, 0, 1])) / 2
    parts = TokenLabelLoss().parts(_output(), torch.tensor([1, 2]), torch.tensor(DENSE))
    assert parts.cls_loss.item() == pytest.approx(cls_ce, rel=1e-6)
    assert parts.dense_loss.item() == pytest.approx(dense_ce, rel=1e-6)
    assert parts.loss.item() == pytest.approx(cls_ce + 0.5 * dense_ce, rel=1e-6)
    loss = TokenLabelLoss(dense_weight=2.0)(_output(), torch.tensor([1, 2]), torch.tensor(DENSE))
    assert loss.item() == pytest.approx(cls_ce + 2.0 * dense_ce, rel=1e-6)


def test_mixtoken_mixes_the_class_target_and_leaves_dense_targets_alone():
    target, dense = torch.tensor([0, 2]), torch.tensor(DENSE)
    mixed = TokenLabelLoss().parts(_output((0, 0, 1, 1), lam=0.75), target, dense)
    plain = TokenLabelLoss().parts(_output(), target, dense)
    cls_ce = (
        soft_ce(CLS[0], [0.75, 0.0, 0.25]) + soft_ce(CLS[1], [0.25, 0.0, 0.75])
    ) / 2  # lam * y + (1 - lam) * y.flip(0)
    assert mixed.cls_loss.item() == pytest.approx(cls_ce, rel=1e-6)
    assert mixed.dense_loss.item() == pytest.approx(plain.dense_loss.item(), rel=1e-7)


def test_soft_and_smoothed_class_targets():
    soft = torch.tensor([[0.2, 0.8, 0.0], [0.0, 0.5, 0.5]])  # e.g. from timm Mixup
    parts = TokenLabelLoss(label_smoothing=0.3).parts(_output(), soft, torch.tensor(DENSE))
    expected = (soft_ce(CLS[0], [0.2, 0.8, 0.0]) + soft_ce(CLS[1], [0.0, 0.5, 0.5])) / 2
    assert parts.cls_loss.item() == pytest.approx(expected, rel=1e-6)  # used as given

    parts = TokenLabelLoss(label_smoothing=0.3).parts(_output(), torch.tensor([1, 2]), None)
    on, off = 0.7 + 0.1, 0.1
    expected = (soft_ce(CLS[0], [off, on, off]) + soft_ce(CLS[1], [off, off, on])) / 2
    assert parts.cls_loss.item() == pytest.approx(expected, rel=1e-6)
    # Without dense targets every token of an image gets that image's class target.
    dense = sum(soft_ce(z, [off, on, off]) for z in AUX[0]) + sum(
        soft_ce(z, [off, off, on]) for z in AUX[1]
    )
    assert parts.dense_loss.item() == pytest.approx(dense / 4, rel=1e-6)


def test_bad_shapes_and_weights_are_rejected():
    with pytest.raises(ValueError, match="dense target"):
        TokenLabelLoss()(_output(), torch.tensor([1, 2]), torch.zeros(2, 3, 3))
    with pytest.raises(UserInputError, match="dense_weight"):
        TokenLabelLoss(dense_weight=-1.0)


def test_mixtoken_aux_logits_line_up_with_their_own_images(monkeypatch):
    """With token-local features, each patch logit names the image its patch came from.

    Image b is channel b switched on; the stem sums each channel over the patch, the blocks
    are skipped (attention would mix tokens), and the token head reads channel b as class b.
    """
    model = RefinerViT(
        img_size=16, patch_size=4, in_chans=4, embed_dim=8, depth=2, num_heads=2,
        num_classes=4, stem="linear",
    )  # fmt: skip
    with torch.no_grad():
        model.patch_embed.proj.weight.zero_()
        model.patch_embed.proj.bias.zero_()
        for c in range(4):
            model.patch_embed.proj.weight[c, c] = 1.0
        model.pos_embed.zero_()
        model.aux_head.weight.zero_()
        model.aux_head.weight[:, :4] = torch.eye(4)
        model.aux_head.bias.zero_()
    monkeypatch.setattr(model, "blocks", torch.nn.ModuleList())  # tokens go straight to the norm
    box = (1, 0, 3, 2)  # rows 1-2, columns 0-1 of the 4 x 4 grid
    monkeypatch.setattr(model, "sample_mix_box", lambda grid: (box, 0.75))
    x = torch.eye(4).view(4, 4, 1, 1).expand(4, 4, 16, 16).contiguous()

    out = model.train().forward_train(x, mix_token=True)
    assert out.box == box and out.lam == 0.75
    own = torch.arange(4)[:, None].expand(4, 16)
    assert torch.equal(out.aux_logits.argmax(-1), own)
    # Control: inside the box the model did see the flipped batch before the swap-back.
    seen = model.aux_head(model.forward_features(x, box)[:, 1:]).argmax(-1).view(4, 4, 4)
    assert torch.equal(seen[:, 1:3, 0:2], (3 - torch.arange(4)).view(4, 1, 1).expand(4, 2, 2))

    # So the dense targets must be each image's own map, not flipped inside the box.
    dense = F.one_hot(own, 4).float()
    flipped = dense.view(4, 4, 4, 4).clone()
    flipped[:, 1:3, 0:2] = flipped.flip(0)[:, 1:3, 0:2]
    loss = TokenLabelLoss(dense_weight=1.0)
    right = loss.parts(out, torch.arange(4), dense).dense_loss
    wrong = loss.parts(out, torch.arange(4), flipped.view(4, 16, 4)).dense_loss
    assert right < wrong
    # Every token's own-image target is its most likely class, so the own-target loss is
    # the per-token minimum over one-hot targets.
    per_class = -F.log_softmax(out.aux_logits, -1)
    assert right.item() == pytest.approx(per_class.min(-1).values.mean().item(), rel=1e-6)


# ----------------------------------------------------------------------------- penalty
def test_penalty_is_one_for_identical_and_zero_for_disjoint_maps():
    torch.manual_seed(0)
    a = torch.rand(2, 3, 5, 5)
    assert attention_similarity_penalty([a, a.clone()], 1, weight=1.0).item() == pytest.approx(1.0)
    mask = (torch.rand(2, 3, 5, 5) > 0.5).float()
    disjoint = [a * mask, torch.rand(2, 3, 5, 5) * (1 - mask)]
    assert attention_similarity_penalty(disjoint, 1, weight=1.0).item() == pytest.approx(0.0)
    # Default weight 0.1, mean over the first num_pairs pairs; later maps are ignored.
    heads01, head2 = a.clone(), a.clone()
    heads01[:, 2], head2[:, :2] = 0, 0
    maps = [heads01, heads01.clone(), head2, torch.rand(2, 3, 5, 5)]  # pairs: 1, 0, (unused)
    assert attention_similarity_penalty(maps, 2).item() == pytest.approx(0.1 * (1 + 0) / 2)


def test_penalty_takes_the_cosine_over_heads_at_each_position():
    torch.manual_seed(1)
    a = torch.rand(2, 4, 6, 6)
    rescaled = a * torch.rand(2, 1, 6, 6)  # a different positive scale at every (q, k)
    assert attention_similarity_penalty([a, rescaled], 1, 1.0).item() == pytest.approx(1.0)
    flat = F.cosine_similarity(a.flatten(1), rescaled.flatten(1), dim=1).mean().item()
    assert flat < 0.99  # a whole-map cosine would not be 1


def test_penalty_on_the_maps_a_model_hands_on():
    model = RefinerViT(img_size=32, patch_size=4, embed_dim=32, depth=4, num_heads=4, num_classes=3)
    maps = model.eval().forward_attention_maps(torch.randn(2, 3, 32, 32))
    assert isinstance(maps[0], AttentionMaps) and model.block_types[:2] == ["plain", "shared"]
    # The shared block hands on the map it received: that pair adds exactly weight.
    assert attention_similarity_penalty(maps, 1, weight=1.0).item() == pytest.approx(1.0)
    raw = [m.raw for m in maps]
    assert attention_similarity_penalty(maps, 3).item() == pytest.approx(
        attention_similarity_penalty(raw, 3).item()
    )
    with pytest.raises(UserInputError, match="num_pairs=4 needs 5 attention maps"):
        attention_similarity_penalty(maps, 4)
    with pytest.raises(UserInputError, match="num_pairs=0"):
        attention_similarity_penalty(maps, 0)


# ----------------------------------------------------------------------------- end to end
def test_token_labelled_training_step_is_finite(jpeg_tree, tmp_path):
    root, label_dir = jpeg_tree.path / "train", tmp_path / "maps"
    generator = torch.Generator().manual_seed(0)
    for image in sorted(root.rglob("*.JPEG")):  # random top-3 maps on a 7 x 7 grid
        scores = (torch.randn(3, 7, 7, generator=generator) * 4).sort(0, descending=True).values
        classes = torch.stack([torch.randperm(3, generator=generator) for _ in range(49)])
        save_label_map(label_map_path(label_dir, image, root), scores, classes.T.reshape(3, 7, 7))
    tf = build_token_label_transform(32, mean=(0.5,) * 3, std=(0.5,) * 3)
    dataset = TokenLabelImageFolder(root, label_dir, tf)
    loader = DataLoader(dataset, batch_size=4, shuffle=True, drop_last=True)

    # Seeded: timm's RandAugment (python `random`) draws PosterizeIncreasing at magnitude 10
    # now and then, i.e. 0 bits, which Pillow >= 13 rejects (an upstream issue).
    random.seed(0)
    torch.manual_seed(0)
    model = RefinerViT(img_size=32, patch_size=4, embed_dim=32, depth=4, num_heads=4, num_classes=3)
    model.train()
    mixup = TokenLabelMixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=3)
    criterion = TokenLabelLoss()
    for images, targets, crops in loader:
        dense = dense_label_targets(crops, 3, model.grid_size, smoothing=0.1)
        assert dense.shape == (4, 64, 3)
        images, soft, dense = mixup(images, targets, dense, model.grid_size)
        out = model.forward_train(images)
        loss = criterion(out, soft, dense)
        loss = loss + attention_similarity_penalty(model.forward_attention_maps(images), 2)
        model.zero_grad()
        loss.backward()
        assert torch.isfinite(loss)
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        assert model.aux_head.weight.grad.abs().sum() > 0
        assert all(torch.isfinite(g).all() for g in grads)
