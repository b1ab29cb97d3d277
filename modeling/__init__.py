"""Files copied into llmdrop exports (remote code). They import only torch and transformers."""
