"""Evaluation: feature extractors, FID / IS / precision-recall, super-resolution metrics,
the per-stage evaluation runs and the tuned settings they write.
"""
