//! Numbers for people: local times, relative ages ("3 min ago"), durations ("1.2 s") and
//! sizes ("16 MiB"). Only text output uses these; `-o json|yaml` stays machine-exact
//! (RFC 3339 times in UTC, durations in milliseconds, sizes in bytes).

use std::time::{Duration, SystemTime};

use jiff::tz::TimeZone;

/// What a missing value prints as in a table or a detail view.
pub const NONE: &str = "-";

/// `2026-12-02 14:05:09 CET`: the time in the system's time zone (`TZ`, else
/// /etc/localtime), to the second.
pub fn local_time(t: Option<&prost_types::Timestamp>) -> String {
    local_time_in(t, &TimeZone::system())
}

/// [`local_time`] in a given zone (tests pass a fixed one).
pub fn local_time_in(t: Option<&prost_types::Timestamp>, zone: &TimeZone) -> String {
    let Some(ts) = t.and_then(|t| jiff::Timestamp::new(t.seconds, 0).ok()) else {
        return NONE.to_owned();
    };
    ts.to_zoned_datetime(zone.clone())
        .strftime("%Y-%m-%d %H:%M:%S %Z")
        .to_string()
}

/// `2026-12-02 14:05:09 CET (3 min ago)`: for detail views, where both help.
pub fn local_time_and_age(t: Option<&prost_types::Timestamp>) -> String {
    match t {
        Some(_) => format!("{} ({})", local_time(t), ago(t)),
        None => NONE.to_owned(),
    }
}

/// How long ago `t` was, in its largest whole unit: `just now`, `42 s ago`,
/// `3 min ago`, `5 h ago`, `2 days ago`. A time in the future (a clock ahead of this
/// machine's) reads `just now` rather than a negative age.
pub fn ago(t: Option<&prost_types::Timestamp>) -> String {
    match t.and_then(to_system_time) {
        Some(t) => ago_at(t, SystemTime::now()),
        None => NONE.to_owned(),
    }
}

/// [`ago`] as seen at `now`.
pub fn ago_at(t: SystemTime, now: SystemTime) -> String {
    let secs = now.duration_since(t).map_or(0, |d| d.as_secs());
    match secs {
        0..=1 => "just now".to_owned(),
        2..=59 => format!("{secs} s ago"),
        60..=3_599 => format!("{} min ago", secs / 60),
        3_600..=86_399 => format!("{} h ago", secs / 3_600),
        86_400..=172_799 => "1 day ago".to_owned(),
        _ => format!("{} days ago", secs / 86_400),
    }
}

/// A time that may lie ahead (an expiry): `in 14 min`, or [`ago`] once it has passed.
pub fn relative(t: Option<&prost_types::Timestamp>) -> String {
    match t.and_then(to_system_time) {
        Some(t) => relative_at(t, SystemTime::now()),
        None => NONE.to_owned(),
    }
}

/// [`relative`] as seen at `now`.
pub fn relative_at(t: SystemTime, now: SystemTime) -> String {
    match t.duration_since(now) {
        Ok(ahead) if ahead.as_secs() >= 2 => {
            let back = now - ahead;
            // The same units as an age, said forwards.
            format!("in {}", ago_at(back, now).trim_end_matches(" ago"))
        }
        _ => ago_at(t, now),
    }
}

/// `2026-12-02 14:05:09 CET (in 14 min)`: for expiries in detail views.
pub fn local_time_and_relative(t: Option<&prost_types::Timestamp>) -> String {
    match t {
        Some(_) => format!("{} ({})", local_time(t), relative(t)),
        None => NONE.to_owned(),
    }
}

/// A duration as people read them: `850 ms`, `1.2 s`, `42 s`, `3 min 5 s`, `2 h 10 min`.
pub fn duration(d: Duration) -> String {
    let ms = d.as_millis();
    let secs = d.as_secs();
    if ms < 1_000 {
        format!("{ms} ms")
    } else if secs < 10 && d.subsec_millis() >= 50 {
        format!("{:.1} s", d.as_secs_f64())
    } else if secs < 60 {
        format!("{secs} s")
    } else if secs < 3_600 {
        match secs % 60 {
            0 => format!("{} min", secs / 60),
            s => format!("{} min {s} s", secs / 60),
        }
    } else {
        match (secs % 3_600) / 60 {
            0 => format!("{} h", secs / 3_600),
            m => format!("{} h {m} min", secs / 3_600),
        }
    }
}

/// A protobuf duration as [`duration`]; `-` when unset or negative.
pub fn proto_duration(d: Option<&prost_types::Duration>) -> String {
    d.and_then(|d| Duration::try_from(*d).ok())
        .map_or_else(|| NONE.to_owned(), duration)
}

/// The time from `start` to `end` as [`duration`]; `-` unless both are set (and in order).
pub fn between(
    start: Option<&prost_types::Timestamp>,
    end: Option<&prost_types::Timestamp>,
) -> String {
    span(start, end).map_or_else(|| NONE.to_owned(), duration)
}

/// The time from `start` to `end`, if both are set and in order.
pub fn span(
    start: Option<&prost_types::Timestamp>,
    end: Option<&prost_types::Timestamp>,
) -> Option<Duration> {
    let (start, end) = (to_system_time(start?)?, to_system_time(end?)?);
    end.duration_since(start).ok()
}

/// Bytes in binary units: `512 B`, `1.5 KiB`, `16 MiB`, `2.0 GiB`.
pub fn size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else if value < 10.0 && value.fract() >= 0.05 {
        format!("{value:.1} {}", UNITS[unit])
    } else {
        format!("{value:.0} {}", UNITS[unit])
    }
}

fn to_system_time(t: &prost_types::Timestamp) -> Option<SystemTime> {
    SystemTime::try_from(*t).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(seconds: i64) -> prost_types::Timestamp {
        prost_types::Timestamp { seconds, nanos: 0 }
    }

    #[test]
    fn sizes_use_binary_units_and_drop_a_needless_decimal() {
        assert_eq!(size(0), "0 B");
        assert_eq!(size(512), "512 B");
        assert_eq!(size(1536), "1.5 KiB");
        assert_eq!(size(16 * 1024 * 1024), "16 MiB");
        assert_eq!(size(4 * 1024 * 1024), "4 MiB");
        assert_eq!(size(2_147_483_648), "2 GiB");
        assert_eq!(size(10_400_000), "9.9 MiB");
        assert_eq!(size(10_500_000), "10 MiB");
    }

    #[test]
    fn durations_read_like_a_person_says_them() {
        assert_eq!(duration(Duration::from_millis(850)), "850 ms");
        assert_eq!(duration(Duration::from_millis(1_230)), "1.2 s");
        assert_eq!(duration(Duration::from_secs(42)), "42 s");
        assert_eq!(duration(Duration::from_secs(185)), "3 min 5 s");
        assert_eq!(duration(Duration::from_secs(120)), "2 min");
        assert_eq!(duration(Duration::from_secs(7_800)), "2 h 10 min");
        assert_eq!(proto_duration(None), "-");
    }

    #[test]
    fn ages_are_relative_in_the_largest_whole_unit() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let at = |back: u64| ago_at(now - Duration::from_secs(back), now);
        assert_eq!(at(0), "just now");
        assert_eq!(at(42), "42 s ago");
        assert_eq!(at(185), "3 min ago");
        assert_eq!(at(5 * 3_600 + 10), "5 h ago");
        assert_eq!(at(90_000), "1 day ago");
        assert_eq!(at(3 * 86_400), "3 days ago");
        // A server clock ahead of ours: not "-3 s ago".
        assert_eq!(ago_at(now + Duration::from_secs(3), now), "just now");
    }

    #[test]
    fn expiries_ahead_read_forwards() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        assert_eq!(
            relative_at(now + Duration::from_secs(14 * 60 + 5), now),
            "in 14 min"
        );
        assert_eq!(
            relative_at(now + Duration::from_secs(3 * 86_400), now),
            "in 3 days"
        );
        assert_eq!(
            relative_at(now - Duration::from_secs(120), now),
            "2 min ago"
        );
    }

    #[test]
    fn local_times_are_in_the_given_zone() {
        let plus_one = TimeZone::fixed(jiff::tz::offset(1));
        // 2026-12-02T01:50:23Z
        let t = ts(1_796_176_223);
        assert_eq!(
            local_time_in(Some(&t), &TimeZone::UTC),
            "2026-12-02 01:50:23 UTC"
        );
        assert_eq!(
            local_time_in(Some(&t), &plus_one),
            "2026-12-02 02:50:23 +01"
        );
        assert_eq!(local_time_in(None, &TimeZone::UTC), "-");
    }

    #[test]
    fn spans_need_both_ends_in_order() {
        assert_eq!(between(Some(&ts(10)), Some(&ts(13))), "3 s");
        assert_eq!(between(Some(&ts(10)), None), "-");
        assert_eq!(between(Some(&ts(13)), Some(&ts(10))), "-");
    }
}
