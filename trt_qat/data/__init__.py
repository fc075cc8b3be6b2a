"""Datasets: YOLO-format and COCO-JSON loaders, letterbox, and the digits-det demo generator."""
