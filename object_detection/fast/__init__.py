"""Speed code behind one switch (`Options`; the trainer's `--speed stock` turns every piece off).
`apply(model, options)` makes a built Mask R-CNN compute the same function faster, each piece in a
file of its own, all by one mechanism (`patch.swap`: a module's class becomes a subclass;
parameters and state-dict keys stay):

- fold_bn: frozen BatchNorm folded into the convolutions;
- fuse_bias: then each backbone bias, residual and ReLU in one pass (bias_act's Triton kernel);
  downsample_with_conv1: then a stage's first block reads its input with one convolution for conv1
  and the downsample, both 1x1 with the reference's stride (GPUs);
- sync_free: detection heads without host synchronisations (nms, sampler; nms_scan: none in NMS);
- padded_heads: then the RPN's proposals and the RoI heads' samples at fixed sizes: one wait per
  training forward (with roi_align and nms_scan). Both off: the step measured the same without the
  waits (BENCHMARKS.md); they are the fixed shapes CUDA graphs over the heads will need;
- transform: the input transform without synchronisations, batched mask pasting, and (optionally)
  one padded input shape per orientation;
- channels_last: backbone and RPN head in channels_last (GPUs);
- roi_align: then multi-scale RoIAlign in one Triton kernel reading those maps in their own dtype,
  with no per-level counts read on the host;
- mask_channels_last, mask_roi_bucket: the mask branch in channels_last, and on its positive RoIs
  padded to a multiple of 64, so cuDNN reuses its plans instead of building them for every new RoI
  count on the host (mask_branch);
- fpn_broadcast: the FPN's top-down sums as one broadcasting addition each, with no upsampled map
  made (fpn; GPUs);
- rpn_one_output_conv: the RPN head's objectness and box convolutions as one (rpn_head; GPUs);
- head_bias_act: the FPN's, RPN head's and mask head's convolution biases, and their ReLUs, added in
  one vectorised pass by bias_act's kernel (head_bias; GPUs, off until it pays; cudnn_fusion takes
  these convolutions where both are on);
- cudnn_fusion: the backbone's convolutions, and the RPN and mask heads' convolution-ReLU pairs, with
  their bias, shortcut and ReLU applied by cuDNN as it writes the output (cudnn_fusion; GPUs);
- cuda_graphs: the backbone with its FPN, and the RPN head, replayed as CUDA graphs in training (on
  the fixed canvas, which it implies);
- mask_targets_kernel: the reference recipe's polygon mask targets drawn in one Triton kernel (rasterise)
  instead of ~170 tensor operations a step.

The loop around the model reads three more: loader workers that live for the whole run
(`persistent_workers`, object_detection/train.py), the next batch copied to the GPU on a side stream
while a step computes (`prefetch`, engine.on_device), and the set-up's objects out of the garbage
collector's passes (`freeze_setup`, engine.freeze_setup).

Evaluation's speed pieces are under the same switch (`evaluation`): scoring.FastEvaluation hands
CocoEvaluator the GPU mask encoder (rle_gpu), the one-pass results loader, faster-coco-eval and the
worker processes; the trainer's `--speed stock` gives it evaluate.StockEvaluation instead.

Several pieces build on private torchvision functions, so `apply` checks the torchvision version
against the range they were tested with; outside it the model stays stock (one warning line) and
still trains, only slower.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # importable without torch: the launcher checks --speed, evaluation's pieces import it
    from torchvision.models.detection import MaskRCNN

# torchvision releases the speed pieces were checked against: 0.26 (H200, the same-function checks
# of benchmarks/train_throughput.py) and 0.29 (CPU, tests/test_model.py and tests/test_sync_free.py).
TESTED_TORCHVISION = ((0, 26), (0, 29))


@dataclass(frozen=True)
class Options:
    """Which speed pieces `apply` uses; `for_device` gives what the trainer runs."""
    fold_bn: bool = True
    fuse_bias: bool = True           # needs fold_bn
    downsample_with_conv1: bool = False  # GPUs (for_device), with fuse_bias: conv1 and the downsample as one conv
    sync_free: bool = True           # implies batched_sampler
    padded_heads: bool = False       # with sync_free: fixed proposal and RoI slots, one wait per training forward
    nms_scan: bool = False           # with sync_free: NMS by a Triton walk per group, no wait (GPUs)
    batched_sampler: bool = True
    transform: bool = True
    channels_last: bool = False      # pays on GPUs only (tensor cores); on a CPU it is slower
    rpn_channels_last: bool = True   # with channels_last: the RPN head takes channels_last maps too
    roi_align: bool = True           # with channels_last: one kernel pools every level (fast.roi_align)
    mask_channels_last: bool = False  # GPUs (for_device), with channels_last and sync_free: the mask branch too
    mask_roi_bucket: bool = False     # GPUs (for_device), with sync_free: the mask branch on RoIs padded to x64
    head_bias_act: bool = False      # GPUs: the heads' conv biases and ReLUs by bias_act (fast.head_bias)
    cudnn_fusion: bool = False       # GPUs: convolution, bias, shortcut and ReLU in one cuDNN call (fast.cudnn_fusion)
    fpn_broadcast: bool = False      # GPUs (for_device): the FPN's top-down sums without upsampled maps (fast.fpn)
    rpn_one_output_conv: bool = False  # GPUs (for_device): the RPN head's two 1x1 output convs as one (fast.rpn_head)
    fixed_canvas: bool = False       # pad every batch to the largest input (800x1344): fixed shapes
    cuda_graphs: bool = False        # GPUs: backbone, FPN and RPN head as CUDA graphs (implies fixed_canvas)
    mask_targets_kernel: bool = False  # GPUs (for_device): the polygon mask targets in one Triton kernel (fast.rasterise)
    persistent_workers: bool = True  # no loader start-up at every epoch (and evaluation)
    prefetch: bool = True            # CUDA: batch copies on a side stream, overlapping the step
    freeze_setup: bool = True        # gc.freeze() after set-up: the annotations leave every collection
    evaluation: bool = True          # evaluation's pieces (scoring.FastEvaluation), not evaluate.StockEvaluation

    @classmethod
    def for_device(cls, device_type: str) -> Options:
        cuda = device_type == "cuda"
        return cls(channels_last=cuda, mask_targets_kernel=cuda, mask_channels_last=cuda, mask_roi_bucket=cuda,
                   fpn_broadcast=cuda, rpn_one_output_conv=cuda, downsample_with_conv1=cuda)


STOCK = Options(**{field.name: False for field in fields(Options)})  # every piece off


WITHOUT, WITH = "fast-without:", "fast-with:"


def options_for(speed: str, device_type: str) -> Options:
    """The pieces `--speed` names: `fast` (all that pay on this device), `stock` (none),
    `fast-without:LEVER[,LEVER...]` (all but those: how a lever's effect is measured, or a
    suspected one ruled out) or `fast-with:LEVER[,LEVER...]` (those on too: a lever that is off
    until it pays). A ValueError says what is wrong in one line."""
    if speed == "stock":
        return STOCK
    if speed == "fast":
        return Options.for_device(device_type)
    levers = [field.name for field in fields(Options)]
    prefix = next((p for p in (WITHOUT, WITH) if speed.startswith(p)), None)
    named = speed[len(prefix):].split(",") if prefix else None
    if not named or not all(named):
        raise ValueError(f"--speed must be fast, stock, {WITHOUT}LEVER[,LEVER...] or {WITH}LEVER[,LEVER...], "
                         f"not {speed!r}")
    unknown = [name for name in named if name not in levers]
    if unknown:
        raise ValueError(f"--speed {speed}: no lever named {', '.join(unknown)} (levers: {', '.join(levers)})")
    return replace(Options.for_device(device_type), **dict.fromkeys(named, prefix == WITH))


def torchvision_tested(version: str | None = None) -> bool:
    import torchvision

    release = tuple(int(part) for part in (version or torchvision.__version__).split("+")[0].split(".")[:2])
    low, high = TESTED_TORCHVISION
    return low <= release <= high


_warned = []


def apply(model: MaskRCNN, options: Options = Options()) -> MaskRCNN:
    """The speed pieces `options` names, in the order they build on each other; `model` returned."""
    if options != STOCK and not torchvision_tested():
        if not _warned:
            import torchvision

            print(f"warning: torchvision {torchvision.__version__} is outside the range the speed code was "
                  f"tested with ({'.'.join(map(str, TESTED_TORCHVISION[0]))} to "
                  f"{'.'.join(map(str, TESTED_TORCHVISION[1]))}): training with torchvision's own "
                  "(slower) model code", file=sys.stderr)
            _warned.append(True)
        return model
    import torch

    from object_detection.fast import fold_bn, fuse_bias, padded_heads, patch, sampler, sync_free, transform
    from object_detection.fast.channels_last import use_channels_last

    if options.fold_bn:
        fold_bn.fold_frozen_batchnorm(model.backbone)
        if options.fuse_bias:
            fuse_bias.fuse_bias_relu(model.backbone)
            if options.downsample_with_conv1:
                fuse_bias.share_input_of_downsample(model.backbone)
    if options.transform:
        size, divisible = max(model.transform.min_size), model.transform.size_divisible
        fixed = options.fixed_canvas or options.cuda_graphs
        canvas = (size, -(-model.transform.max_size // divisible) * divisible) if fixed else None
        patch.swap(model.transform, transform.SyncFreeTransform, canvas=canvas)
    if options.sync_free:
        sync_free.make_sync_free(model, nms_scan=options.nms_scan)
        if options.padded_heads:
            padded_heads.use_padded_heads(model)
    elif options.batched_sampler:
        sampler.use_batched_sampler(model)
    if options.channels_last:
        use_channels_last(model, rpn_channels_last=options.rpn_channels_last, contiguous_heads=not options.roi_align)
        mask_channels_last = options.mask_channels_last and options.sync_free and model.roi_heads.has_mask()
        if options.roi_align:
            from object_detection.fast.roi_align import use_fused_roi_align

            use_fused_roi_align(model, mask_channels_last=mask_channels_last)
        if mask_channels_last:
            model.roi_heads.mask_head.to(memory_format=torch.channels_last)
            model.roi_heads.mask_predictor.to(memory_format=torch.channels_last)
            model.roi_heads.mask_channels_last = True
    if options.mask_roi_bucket and options.sync_free:
        model.roi_heads.mask_roi_bucket = True
    if options.fpn_broadcast:
        from object_detection.fast.fpn import use_broadcast_top_down

        use_broadcast_top_down(model)
    if options.rpn_one_output_conv:
        from object_detection.fast.rpn_head import use_one_output_conv

        use_one_output_conv(model)
    if options.cudnn_fusion:
        from object_detection.fast.cudnn_fusion import use_cudnn_fusion

        use_cudnn_fusion(model)
    if options.head_bias_act:  # after cudnn_fusion, which takes the convolution-ReLU pairs where it is on
        from object_detection.fast.head_bias import use_head_bias_act

        use_head_bias_act(model)
    if options.cuda_graphs:
        from object_detection.fast.graphs import capture_in_training

        capture_in_training(model)
    if options.mask_targets_kernel:
        from object_detection.fast.rasterise import crop_and_rasterise

        model.roi_heads.draw_mask_targets = crop_and_rasterise
    return model
