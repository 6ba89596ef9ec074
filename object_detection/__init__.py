"""The Mask R-CNN trainer (model, data, loop, COCO evaluation, synthetic shapes); imports torch."""
