"""Privacy auditing: epsilon lower bounds from the scores of canary releases."""

from dpjax.audit.gdp import gdp_delta, gdp_epsilon, gdp_mu
from dpjax.audit.stats import (
    Method,
    Selection,
    auc,
    clopper_pearson_upper,
    epsilon_lower_bound,
    gdp_mu_lower_bound,
    one_run_epsilon_lower_bound,
    one_run_p_value,
    tpr_at_fpr,
)

__all__ = [
    "Method",
    "Selection",
    "auc",
    "clopper_pearson_upper",
    "epsilon_lower_bound",
    "gdp_delta",
    "gdp_epsilon",
    "gdp_mu",
    "gdp_mu_lower_bound",
    "one_run_epsilon_lower_bound",
    "one_run_p_value",
    "tpr_at_fpr",
]
