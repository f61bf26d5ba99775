"""eqx-pi05: the π0.5 vision-language-action policy in JAX + Equinox. The public API, by name.

    import eqx_pi05 as pi
    model = pi.load_checkpoint("checkpoints/pi05_base/params", pi.pi05_full())
    actions = pi.sample_actions(model, pi.Observation.from_batch(batch), noise)

Training runs (`train.py`), evaluation (`evaluate.py`) and the policy server (`eqx_pi05.serve`) are
entry points, not library API; their configs are `eqx_pi05.variants`.
"""

from eqx_pi05.cameras import CAMERAS as CAMERAS
from eqx_pi05.cameras import PADDING_SLOT as PADDING_SLOT
from eqx_pi05.cameras import SLOTS as SLOTS
from eqx_pi05.cameras import compact as compact
from eqx_pi05.cameras import drop as drop
from eqx_pi05.cameras import mask as mask
from eqx_pi05.cameras import zero as zero
from eqx_pi05.config import Pi05Config as Pi05Config
from eqx_pi05.config import pi05_full as pi05_full
from eqx_pi05.config import pi05_tiny as pi05_tiny
from eqx_pi05.convert.lerobot import from_lerobot as from_lerobot
from eqx_pi05.convert.lerobot import to_lerobot as to_lerobot
from eqx_pi05.convert.openpi import from_openpi as from_openpi
from eqx_pi05.convert.openpi import load_checkpoint as load_checkpoint
from eqx_pi05.convert.openpi import save_checkpoint as save_checkpoint
from eqx_pi05.convert.openpi import to_openpi as to_openpi
from eqx_pi05.loss import DistillConfig as DistillConfig
from eqx_pi05.loss import bc_per_sample as bc_per_sample
from eqx_pi05.loss import flow_matching as flow_matching
from eqx_pi05.loss import train_loss as train_loss
from eqx_pi05.model import Observation as Observation
from eqx_pi05.model import Pi05 as Pi05
from eqx_pi05.model import sample_actions as sample_actions
from eqx_pi05.model import sample_noise_and_time as sample_noise_and_time
