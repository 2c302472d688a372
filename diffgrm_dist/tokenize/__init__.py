"""Semantic IDs (PSE): item text to sentence-transformers embeddings on Ray actors
(``embed``), optional co-occurrence vectors (``collaborative``), OPQ + PQ codes with faiss
(``quantize``), and the tokenize stage that writes ``sids.parquet`` (``stage``)."""
