"""Built-in models: a YOLOv5-style detector with its loss, decoding and NMS."""
