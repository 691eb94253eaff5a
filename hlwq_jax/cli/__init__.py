"""Command-line tools: hlwq-quantize, hlwq-dequantize."""
