"""Few-shot segmentation data: one episode contract for every benchmark, deterministic episode lists."""
