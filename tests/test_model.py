"""The model's speed-ups compute the same function as torchvision's code they replace."""
import pytest
import torch
import torchvision
from torchvision.models.detection.roi_heads import paste_masks_in_image
from torchvision.ops import FrozenBatchNorm2d

from torchvision.models.detection._utils import BalancedPositiveNegativeSampler

from object_detection.fast import Options
from object_detection.fast import bias_act as fused
from object_detection.fast.bias_act import bias_act
from object_detection.fast.channels_last import use_channels_last
from object_detection.fast.sampler import BatchedBalancedSampler
from object_detection.fast.transform import paste_masks, paste_masks_batch
from object_detection.model import build_model


def test_batched_mask_paste_matches_torchvision():
    g = torch.Generator().manual_seed(0)
    for height, width, n in [(120, 160, 40), (37, 53, 7), (90, 40, 12)]:
        masks = torch.rand(n, 1, 28, 28, generator=g)
        corner = torch.rand(n, 2, generator=g) * torch.tensor([width, height]) - 5
        size = torch.rand(n, 2, generator=g) * torch.tensor([width, height]) * 0.6 + 0.5
        boxes = torch.cat([corner, corner + size], 1)
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
        expected = paste_masks_in_image(masks, boxes, (height, width))
        got = paste_masks(masks, boxes, (height, width))
        assert got.shape == expected.shape
        assert (got - expected).abs().max() < 1e-5
        assert _same_masks(got, expected)
    assert paste_masks(torch.rand(0, 1, 28, 28), torch.zeros(0, 4), (10, 12)).shape == (0, 1, 10, 12)


def _same_masks(got, expected) -> bool:
    """The same binary masks wherever rounding cannot decide (a value within 1e-5 of the 0.5
    threshold may fall either side when another machine's matrix products round differently)."""
    decided = (expected - 0.5).abs() > 1e-5
    return torch.equal((got > 0.5)[decided], (expected > 0.5)[decided])


def test_masks_of_images_of_different_sizes_pasted_together_match_torchvision():
    """One paste for a batch: each image's masks as torchvision pastes them at that image's size,
    with boxes reaching past its edges (where a larger image of the batch still has pixels)."""
    g = torch.Generator().manual_seed(3)
    shapes, masks, boxes = [(120, 160), (37, 53), (160, 90), (50, 50)], [], []
    for n, (height, width) in zip((30, 0, 12, 5), shapes):
        masks.append(torch.rand(n, 1, 28, 28, generator=g))
        corner = torch.rand(n, 2, generator=g) * torch.tensor([width, height]) - 5
        boxes.append(torch.cat([corner, corner + torch.rand(n, 2, generator=g) * 60 + 1], 1))
    pasted = paste_masks_batch(masks, boxes, shapes)
    for got, m, b, shape in zip(pasted, masks, boxes, shapes):
        expected = paste_masks_in_image(m, b, shape)
        assert got.shape == expected.shape == (len(m), 1, *shape)
        assert len(m) == 0 or (got - expected).abs().max() < 1e-5
        assert _same_masks(got, expected)


@pytest.mark.slow
def test_folded_frozen_batchnorm_is_the_same_function(tmp_path):
    weights = tmp_path / "resnet50.pth"
    torch.save(torchvision.models.resnet50().state_dict(), weights)
    plain = build_model(81, backbone_weights=weights, min_size=96, max_size=128, speed=Options(fold_bn=False))
    folded = build_model(81, backbone_weights=weights, min_size=96, max_size=128, speed=Options(fold_bn=True))
    g = torch.Generator().manual_seed(1)
    for m in plain.modules():  # statistics far from the identity, so a missed layer shows
        if isinstance(m, FrozenBatchNorm2d):
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g))
            m.weight.copy_(torch.randn(m.weight.shape, generator=g))
    folded.load_state_dict(plain.state_dict())  # same keys: folding renames nothing
    # In float64: in float32 the two orders of rounding move a few pre-activations across the
    # ReLU's zero, and each such flip changes a gradient entry by the whole upstream value (1.3e-3
    # relative on one CI machine), which says nothing about folding.
    plain, folded = plain.double(), folded.double()
    x = torch.rand(2, 3, 96, 128, generator=g, dtype=torch.float64)
    a, b = plain.backbone(x), use_channels_last(folded).backbone(x)
    for level in a:
        assert (a[level] - b[level]).norm() / a[level].norm() < 1e-10
        assert b[level].is_contiguous(memory_format=torch.channels_last)  # the RPN head takes them so
    # The same gradients too: folding keeps the parametrisation, the fused bias-ReLU's backward
    # (object_detection.fast.bias_act) is autograd's.
    sum((level * level.detach().sign()).mean() for level in a.values()).backward()
    sum((level * level.detach().sign()).mean() for level in b.values()).backward()
    theirs = dict(plain.backbone.named_parameters())
    compared = 0
    for name, parameter in folded.backbone.named_parameters():
        if parameter.requires_grad:
            expected = theirs[name].grad
            assert (parameter.grad - expected).norm() / expected.norm() < 1e-10, name
            compared += 1
    assert compared == len([p for p in plain.backbone.parameters() if p.requires_grad]) == 58


@pytest.mark.slow
def test_evaluation_folds_once_and_never_with_stale_weights(tmp_path, monkeypatch):
    """Without autograd the folded weights are kept between batches, and in training only the
    trainable weights are folded again (the frozen norms' constants and the frozen stages' pairs
    are kept); a training step (fused SGD, which leaves version counters alone) or load_state_dict
    is seen by the next evaluation."""
    from object_detection.fast import fold_bn as model_module

    weights = tmp_path / "resnet50.pth"
    torch.save(torchvision.models.resnet50().state_dict(), weights)
    net = build_model(81, backbone_weights=weights, min_size=64, max_size=96)
    folds, norms = [], []
    fold, norm = model_module._fold, model_module._norm
    monkeypatch.setattr(model_module, "_fold", lambda weight, n: folds.append(weight) or fold(weight, n))
    monkeypatch.setattr(model_module, "_norm", lambda bn: norms.append(bn) or norm(bn))
    x = torch.rand(1, 3, 64, 96, generator=torch.Generator().manual_seed(5))

    def features():
        with torch.inference_mode():  # as evaluation runs: its tensors must not leak into training
            return net.eval().backbone(x)["0"]

    def fresh_features():
        twin = build_model(81, backbone_weights=weights, min_size=64, max_size=96)
        twin.load_state_dict(net.state_dict())
        with torch.no_grad():
            return twin.eval().backbone(x)["0"]

    first = features()
    assert len(folds) == len(norms) == 53  # every convolution of the ResNet-50 body
    assert torch.equal(features(), first) and len(folds) == 53  # nothing folded again
    net.train()
    trainable = [p for p in net.parameters() if p.requires_grad]
    trainable_convs = sum(1 for m in net.backbone.modules()
                          if isinstance(m, model_module.FoldedConv2d) and m.weight.requires_grad)
    assert trainable_convs == 42  # the reference trains layer2-4 (conv1 and layer1 frozen)
    for step in (1, 2):
        net.backbone(x)["0"].sum().backward()  # saves the kept pairs of evaluation for its backward
        assert len(folds) == 53 + step * trainable_convs and len(norms) == 53
    for p in trainable:  # this random backbone's activations overflow a real loss
        p.grad = torch.full_like(p, 1e-3)
    torch.optim.SGD(trainable, lr=1.0, fused=True).step()
    stepped = features()
    assert not torch.equal(stepped, first)
    torch.testing.assert_close(stepped, fresh_features())
    other = build_model(81, backbone_weights=weights, min_size=64, max_size=96)
    for m in other.modules():
        if isinstance(m, FrozenBatchNorm2d):
            m.running_var.fill_(4.0)
    frozen = net.backbone.body.conv1
    assert not frozen.weight.requires_grad
    kept = frozen.folded()
    net.load_state_dict(other.state_dict())
    torch.testing.assert_close(features(), fresh_features())
    # written where they were: CUDA graphs captured before a checkpoint's restore read them there
    assert all(a is b for a, b in zip(frozen.folded(), kept)) and frozen._norm()[1] is kept[1]


def test_fused_bias_relu_matches_the_separate_operations():
    g = torch.Generator().manual_seed(2)
    for layout in (torch.contiguous_format, torch.channels_last):
        for relu, with_residual in [(True, False), (True, True), (False, False), (False, True)]:
            x = torch.randn(2, 6, 5, 7, generator=g).to(memory_format=layout)
            bias = torch.randn(6, generator=g)
            residual = torch.randn(2, 6, 5, 7, generator=g).to(memory_format=layout)
            grad = torch.randn(2, 6, 5, 7, generator=g)
            inputs = [t.clone().requires_grad_() for t in (x, bias, residual)]
            expected = inputs[0] + inputs[1].reshape(1, -1, 1, 1) + (inputs[2] if with_residual else 0)
            expected = expected.relu() if relu else expected
            expected.backward(grad)
            fused = [t.clone().requires_grad_() for t in (x, bias, residual)]
            got = bias_act(fused[0], fused[1], fused[2] if with_residual else None, relu=relu)
            got.backward(grad)
            assert torch.allclose(got, expected, atol=1e-6)
            assert got.is_contiguous(memory_format=layout)
            for mine, theirs in zip(fused, inputs):
                if theirs.grad is None:
                    assert mine.grad is None
                else:
                    assert torch.allclose(mine.grad, theirs.grad, atol=1e-5)


@pytest.mark.slow
def test_fusion_takes_every_bias_of_the_mlperf_backbone(tmp_path):
    """The stem and 16 bottlenecks (3 convolutions each): 49 fused passes, 16 with a residual."""
    weights = tmp_path / "resnet50.pth"
    torch.save(torchvision.models.resnet50().state_dict(), weights)
    model = build_model(81, backbone_weights=weights, min_size=96, max_size=128).eval()
    calls = []
    forward = fused._BiasAct.forward

    def counted(ctx, x, bias, residual, relu):
        calls.append((residual is not None, relu))
        return forward(ctx, x, bias, residual, relu)

    fused._BiasAct.forward = staticmethod(counted)
    try:
        with torch.no_grad():
            model([torch.rand(3, 96, 128)])
    finally:
        fused._BiasAct.forward = staticmethod(forward)
    assert len(calls) == 49
    assert sum(residual for residual, _ in calls) == 16
    assert all(relu for _, relu in calls)


def test_roi_heads_get_contiguous_maps_when_the_rpn_takes_channels_last():
    model = use_channels_last(build_model(81, backbone_weights=None, min_size=96, max_size=128)).eval()
    seen = []
    inner = model.roi_heads.box_roi_pool.forward
    model.roi_heads.box_roi_pool.forward = lambda x, *a: seen.append(x) or inner(x, *a)
    with torch.no_grad():
        model([torch.rand(3, 96, 128)])
    assert seen and all(f.is_contiguous() for f in seen[0].values())


def test_batched_sampler_draws_what_torchvision_draws():
    """Same counts as torchvision's sampler (min(positives, 128), then negatives up to 512), only
    among eligible entries, per image of any length; and every eligible entry can be drawn."""
    g = torch.Generator().manual_seed(0)
    ours, reference = BatchedBalancedSampler(512, 0.25), BalancedPositiveNegativeSampler(512, 0.25)
    for trial in range(40):
        high = 4 if trial % 3 else 1  # every third trial: no positives at all
        matched = [torch.randint(-1, high, (int(torch.randint(10, 3000, (1,), generator=g)),), generator=g)
                   for _ in range(4)]
        (pos, neg), (ref_pos, ref_neg) = ours(matched), reference(matched)
        for m, p, n, rp, rn in zip(matched, pos, neg, ref_pos, ref_neg):
            assert p.dtype == torch.uint8 and p.shape == m.shape and n.shape == m.shape
            assert int(p.sum()) == int(rp.sum()) and int(n.sum()) == int(rn.sum())
            assert bool((m[p.bool()] >= 1).all()) and bool((m[n.bool()] == 0).all())
    matched = [torch.tensor([1, 1, 1, 0, 0, -1] * 10)]
    sampler = BatchedBalancedSampler(8, 0.5)
    drawn = torch.zeros(60)
    for _ in range(300):
        p, n = sampler(matched)
        drawn += p[0] + n[0]
    assert bool((drawn[matched[0] >= 0] > 0).all()) and bool((drawn[matched[0] < 0] == 0).all())


@pytest.mark.slow
def test_an_untested_torchvision_trains_with_the_stock_model(monkeypatch, capsys):
    """The speed code patches private torchvision functions: outside the tested releases the model
    stays torchvision's own, says so in one line, and still trains."""
    from torchvision.models.detection import MaskRCNN
    from torchvision.models.detection.transform import GeneralizedRCNNTransform

    from object_detection import fast

    assert fast.torchvision_tested("0.26.0") and fast.torchvision_tested("0.29.1+cu130")
    assert not fast.torchvision_tested("0.25.1") and not fast.torchvision_tested("0.30.0")
    monkeypatch.setattr(torchvision, "__version__", "0.31.0")
    monkeypatch.setattr(fast, "_warned", [])
    models = [build_model(81, backbone_weights=None, min_size=64, max_size=96) for _ in range(2)]
    warning = capsys.readouterr().err.strip().splitlines()
    assert len(warning) == 1 and "torchvision 0.31.0 is outside the range" in warning[0]  # once, not per model
    model = models[0]
    assert type(model) is MaskRCNN and type(model.transform) is GeneralizedRCNNTransform
    assert all(type(m).__module__.startswith(("torch.", "torchvision.")) for m in model.modules())
    model.train()
    images = [torch.rand(3, 64, 96, generator=torch.Generator().manual_seed(0))]
    targets = [{"boxes": torch.tensor([[10.0, 10.0, 50.0, 40.0]]), "labels": torch.tensor([3]),
                "masks": torch.zeros(1, 64, 96, dtype=torch.uint8)}]
    losses = model(images, targets)
    assert len(losses) == 5 and all(torch.isfinite(v) for v in losses.values())


def test_a_fixed_canvas_gives_one_input_shape_per_orientation_and_the_same_pixels():
    from object_detection.fast.transform import SyncFreeTransform

    ours = build_model(81, backbone_weights=None, min_size=96, max_size=160, speed=Options(fixed_canvas=True))
    assert ours.transform.canvas == (96, 160)
    stock = SyncFreeTransform(ours.transform.min_size, ours.transform.max_size, ours.transform.image_mean,
                              ours.transform.image_std).eval()
    ours.transform.eval()
    g = torch.Generator().manual_seed(7)
    for sizes, expected in [([(72, 96), (60, 96)], (96, 160)),   # landscape: the canvas
                            ([(96, 72), (90, 60)], (160, 96))]:  # portrait: the canvas turned
        images = [torch.rand(3, h, w, generator=g) for h, w in sizes]
        batch, _ = ours.transform(images)
        plain, _ = stock(images)
        assert tuple(batch.tensors.shape[-2:]) == expected
        h, w = plain.tensors.shape[-2:]
        assert torch.equal(batch.tensors[..., :h, :w], plain.tensors)          # the same pixels
        assert not batch.tensors[..., h:, :].any() and not batch.tensors[..., :, w:].any()  # zeros beyond
        assert batch.image_sizes == plain.image_sizes


def test_cuda_graphs_take_the_fixed_canvas_and_leave_a_cpu_model_as_it_was():
    """fast.Options.cuda_graphs graphs the backbone and RPN head on GPUs only (the GPU check is
    benchmarks/train_throughput.py --check, benchmarks/step_checks.py check_graphs); on a CPU the forward is the plain one."""
    torch.manual_seed(0)
    plain = build_model(81, backbone_weights=None, min_size=96, max_size=160, speed=Options(fixed_canvas=True))
    graphed = build_model(81, backbone_weights=None, min_size=96, max_size=160, speed=Options(cuda_graphs=True))
    graphed.load_state_dict(plain.state_dict())
    assert graphed.transform.canvas == plain.transform.canvas == (96, 160)
    g = torch.Generator().manual_seed(3)
    images = [torch.rand(3, 72, 96, generator=g), torch.rand(3, 60, 96, generator=g)]
    targets = [{"boxes": torch.tensor([[10.0, 10.0, 50.0, 40.0]]), "labels": torch.tensor([3]),
                "masks": torch.zeros(1, h, w, dtype=torch.uint8)} for h, w in ((72, 96), (60, 96))]
    losses = {}
    for name, model in (("plain", plain), ("graphed", graphed)):
        model.train()
        torch.manual_seed(1)
        losses[name] = model(images, targets)
        sum(losses[name].values()).backward()
    assert graphed.backbone._captured == {} and graphed.rpn.head._captured == {}
    assert all(torch.equal(losses["plain"][k], losses["graphed"][k]) for k in losses["plain"])
    assert all(torch.equal(a.grad, b.grad) for a, b in zip(plain.parameters(), graphed.parameters()) if a.grad is not None)
