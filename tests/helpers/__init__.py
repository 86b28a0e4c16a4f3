"""What several test files share: dataset trees, tiny configs and readers, the method
contract's batches, Ray and W&B inspection. Test files import from here, never from each other."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the repository: benchmarks/, configs/, docs/, cluster.yaml
