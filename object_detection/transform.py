"""The model's input transform at torchvision's (stock) level: GeneralizedRCNNTransform with the
resize rule a recipe names. object_detection.fast's SyncFreeTransform builds on this class, so the
rule holds in the fast model too.

The rules differ in rounding only: torchvision scales both sides by one factor and floors them
(a 300x640 image becomes 624x1333); the reference (maskrcnn-benchmark's Resize.get_size, NVIDIA's
too) rounds the short side it aims at and derives the long one (625x1333).
"""
from __future__ import annotations

import torch
from torchvision.models.detection.transform import (GeneralizedRCNNTransform, _resize_image_and_masks,
                                                    resize_boxes, resize_keypoints)

from object_detection.mask_targets import scale_edges

RESIZE_RULES = ("scale", "round")  # torchvision's, the reference's


def reference_size(height: int, width: int, min_size: int, max_size: int) -> tuple[int, int]:
    """(height, width) the reference resizes an image to: the short side to min_size, unless the
    long side would then pass max_size, in which case the short side is max_size x short / long,
    rounded; the long side follows, truncated. An image already at the size stays as it is."""
    short, long = float(min(height, width)), float(max(height, width))
    size = min_size
    if long / short * size > max_size:
        size = int(round(max_size * short / long))
    if (width <= height and width == size) or (height <= width and height == size):
        return height, width
    if width < height:
        return int(size * height / width), size
    return size, int(size * width / height)


def resize_to(image: torch.Tensor, size: tuple[int, int], target: dict | None = None):
    """The image (bilinear) and the target's masks (nearest), as torchvision resizes them, to `size`."""
    image = torch.nn.functional.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]
    if target is not None and "masks" in target:
        masks = target["masks"]
        target["masks"] = torch.nn.functional.interpolate(masks[:, None].float(), size=size)[:, 0].byte()
    return image, target


class InputTransform(GeneralizedRCNNTransform):
    """GeneralizedRCNNTransform whose resize follows `resize_rule` ("scale": torchvision's, the
    class default; "round": the reference's). Boxes follow the image's new shape either way."""

    resize_rule: str = "scale"

    def resize(self, image, target=None):
        if self.training and getattr(self, "_skip_resize", False):
            return image, target
        height, width = image.shape[-2:]
        image, target = self.resize_image(image, target)
        if target is not None:
            self.scale_target(target, (height, width), image.shape[-2:])
        return image, target

    def resize_image(self, image, target=None):
        """The image and the target's masks resized; boxes, polygons and keypoints are scale_target's."""
        size = self.torch_choice(self.min_size) if self.training else self.min_size[-1]
        if self.resize_rule == "round":
            return resize_to(image, reference_size(image.shape[-2], image.shape[-1], size, self.max_size), target)
        return _resize_image_and_masks(image, size, self.max_size, target, self.fixed_size)

    def scale_target(self, target: dict, original_size, new_size) -> None:
        """The target's coordinates (boxes, polygon edges, keypoints) moved from an image of
        `original_size` to the same image at `new_size`, in place of the old tensors."""
        target["boxes"] = self.resize_boxes(target["boxes"], original_size, new_size)
        if "polygon_edges" in target:
            target["polygon_edges"] = scale_edges(target["polygon_edges"], original_size, new_size)
        if "keypoints" in target:
            target["keypoints"] = resize_keypoints(target["keypoints"], original_size, new_size)

    def resize_boxes(self, boxes: torch.Tensor, original_size, new_size) -> torch.Tensor:
        return resize_boxes(boxes, original_size, new_size)


def use_reference_transform(transform: GeneralizedRCNNTransform, recipe) -> GeneralizedRCNNTransform:
    """Make a built model's transform resize by `recipe.resize`: the stock class becomes
    InputTransform (a subclass: state and behaviour otherwise the same), a fast one keeps its class.
    Before or after fast.apply, either way."""
    from object_detection.fast.patch import swap

    if recipe.resize not in RESIZE_RULES:
        raise ValueError(f"resize rule {recipe.resize!r} is not one of {RESIZE_RULES}")
    if not isinstance(transform, InputTransform):
        swap(transform, InputTransform)
    transform.resize_rule = recipe.resize
    return transform
