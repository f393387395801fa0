"""Every error meant for the user derives from rlhf_overlay.errors.UserError, so each CLI prints it as
`error: ...` (exit 2) instead of a traceback; ConfigError is one class for all entry modules."""
from __future__ import annotations

from rlhf_overlay import errors

from rlhf_overlay.tools import chat

from rlhf_overlay.dschat_jobs import launch as dschat_launch

from rlhf_overlay.tools import eval_rm

from rlhf_overlay.runtime import hostfile

from rlhf_overlay.engine import lock

from rlhf_overlay.data import preference_data

from rlhf_overlay.tools import report

from rlhf_overlay.runtime import runs
from rlhf_overlay.engine import setup_engine
from rlhf_overlay.data import tiny_assets
from rlhf_overlay.trlx_jobs import common as trlx_common
def test_user_errors_share_one_base():
    for cls in (lock.LockError, tiny_assets.AssetsError, eval_rm.EvalError, report.ReportError, chat.ChatError,
                preference_data.PreferenceDataError, setup_engine.SetupError, runs.RunDirError,
                hostfile.HostfileError, trlx_common.TrlxSetupError, errors.ConfigError):
        assert issubclass(cls, errors.UserError), cls
    assert dschat_launch.ConfigError is trlx_common.ConfigError is errors.ConfigError
    assert issubclass(errors.ConfigError, ValueError)          # callers that caught ValueError still do
    assert trlx_common.user_errors() == (errors.UserError,)
