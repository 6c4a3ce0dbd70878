"""Annotation-tool integrations on top of the predictor: a shared click engine (encodings cached
per image content), Label Studio's ML backend protocol, Label Studio brush RLE, COCO export."""
