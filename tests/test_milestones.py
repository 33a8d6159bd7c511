"""BabyLM milestones, their names and the tracker's resume state."""
from __future__ import annotations

from jaxllava.checkpoint import format_words, milestone_name
from jaxllava.train.milestones import BABYLM_MILESTONES, MilestoneTracker


def test_milestones_are_the_28_babylm_points():
    millions = [m // 1_000_000 for m in BABYLM_MILESTONES]
    assert millions == list(range(1, 11)) + list(range(20, 101, 10)) + list(range(200, 1001, 100))
    assert len(BABYLM_MILESTONES) == 28


def test_word_counts_format_like_babylm_revisions():
    assert format_words(10_000_000) == "10M"
    assert format_words(1_500_000) == "1.5M"
    assert format_words(1_000_000_000) == "1000M"
    assert format_words(500_000) == "500k"
    assert format_words(2_250) == "2.25k"
    assert format_words(999) == "999"
    assert milestone_name(7_000_000) == "chck_7M"


def test_tracker_reports_each_milestone_once_when_first_reached():
    tracker = MilestoneTracker()
    assert tracker.update(999_999) == []
    assert tracker.update(1_000_000) == [1_000_000]
    assert tracker.update(1_500_000) == []
    assert tracker.update(2_100_000) == [2_000_000]
    assert tracker.update(2_200_000) == []


def test_one_large_step_can_cross_several_milestones():
    tracker = MilestoneTracker()
    assert tracker.update(12_000_000) == [m * 1_000_000 for m in range(1, 11)]
    assert tracker.update(25_000_000) == [20_000_000]


def test_tracker_state_survives_a_resume_without_repeats():
    first = MilestoneTracker()
    first.update(3_200_000)
    resumed = MilestoneTracker(done=first.state()["done"])
    assert resumed.update(3_500_000) == []
    assert resumed.update(4_000_000) == [4_000_000]


def test_custom_milestones_for_small_runs():
    tracker = MilestoneTracker([300, 100, 200])
    assert tracker.update(250) == [100, 200]
    assert tracker.update(300) == [300]
