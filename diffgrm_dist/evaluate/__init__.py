"""Scoring: users to batches to rankings and per-user metrics (``ranking``), Recall/NDCG
(``metrics``), popularity (``baselines``), and the evaluate stage over Ray actors
(``stage``)."""
