"""The Mask R-CNN trainer (model, data, loop, COCO evaluation); imports torch, nothing from mlperf."""
