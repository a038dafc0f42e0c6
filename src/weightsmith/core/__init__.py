"""Shared machinery above the I/O layer: the streaming transform loop, progress and reports."""

from weightsmith.core.report import peak_rss_bytes, write_report
from weightsmith.core.streaming import RawTensor, StreamResult, stream_transform

__all__ = ["RawTensor", "StreamResult", "peak_rss_bytes", "stream_transform", "write_report"]
