"""Which episodes train: the LIBERO suites' task strings, and the selection a DataConfig asks for.

`physical-intelligence/libero` holds the four suites below (40 tasks, 1,693 episodes); openpi's
pi05_libero trains on all of it, the research report on libero_spatial. The strings are LIBERO's
`task.language` (libero.libero.benchmark's `task_maps`, task order 0), which is what the LeRobot
datasets store as each episode's task; tests/test_data_episodes.py checks them against the installed
LIBERO package.
"""

from __future__ import annotations

from typing import Literal

Suite = Literal["libero_spatial", "libero_object", "libero_goal", "libero_10"]

LIBERO_SUITES: dict[str, tuple[str, ...]] = {
    "libero_spatial": (
        "pick up the black bowl between the plate and the ramekin and place it on the plate",
        "pick up the black bowl next to the ramekin and place it on the plate",
        "pick up the black bowl from table center and place it on the plate",
        "pick up the black bowl on the cookie box and place it on the plate",
        "pick up the black bowl in the top drawer of the wooden cabinet and place it on the plate",
        "pick up the black bowl on the ramekin and place it on the plate",
        "pick up the black bowl next to the cookie box and place it on the plate",
        "pick up the black bowl on the stove and place it on the plate",
        "pick up the black bowl next to the plate and place it on the plate",
        "pick up the black bowl on the wooden cabinet and place it on the plate",
    ),
    "libero_object": (
        "pick up the alphabet soup and place it in the basket",
        "pick up the cream cheese and place it in the basket",
        "pick up the salad dressing and place it in the basket",
        "pick up the bbq sauce and place it in the basket",
        "pick up the ketchup and place it in the basket",
        "pick up the tomato sauce and place it in the basket",
        "pick up the butter and place it in the basket",
        "pick up the milk and place it in the basket",
        "pick up the chocolate pudding and place it in the basket",
        "pick up the orange juice and place it in the basket",
    ),
    "libero_goal": (
        "open the middle drawer of the cabinet",
        "put the bowl on the stove",
        "put the wine bottle on top of the cabinet",
        "open the top drawer and put the bowl inside",
        "put the bowl on top of the cabinet",
        "push the plate to the front of the stove",
        "put the cream cheese in the bowl",
        "turn on the stove",
        "put the bowl on the plate",
        "put the wine bottle on the rack",
    ),
    "libero_10": (
        "put both the alphabet soup and the tomato sauce in the basket",
        "put both the cream cheese box and the butter in the basket",
        "turn on the stove and put the moka pot on it",
        "put the black bowl in the bottom drawer of the cabinet and close it",
        "put the white mug on the left plate and put the yellow and white mug on the right plate",
        "pick up the book and place it in the back compartment of the caddy",
        "put the white mug on the plate and put the chocolate pudding to the right of the plate",
        "put both the alphabet soup and the cream cheese box in the basket",
        "put both moka pots on the stove",
        "put the yellow and white mug in the microwave and close it",
    ),
}


def selected_tasks(suites: tuple[str, ...], tasks: tuple[str, ...]) -> tuple[str, ...] | None:
    """The task strings whose episodes train, in suite order then list order; None: every episode."""
    unknown = [s for s in suites if s not in LIBERO_SUITES]
    if unknown:
        raise ValueError(f"data.suites: unknown suite(s) {unknown}; expected some of {list(LIBERO_SUITES)}")
    if suites and tasks:
        raise ValueError(f"data.suites={list(suites)} and data.tasks={list(tasks)}: select episodes by suite or by "
                         "task list, not both (list a suite's tasks in data.tasks to combine them)")
    chosen = [t for s in suites for t in LIBERO_SUITES[s]] + list(tasks)
    if len(set(chosen)) != len(chosen):
        raise ValueError(f"data.suites / data.tasks: a task is selected twice in {chosen}")
    return tuple(chosen) or None
