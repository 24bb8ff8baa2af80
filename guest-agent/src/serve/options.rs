//! A request's scheduling choices from its HTTP headers: `X-Priority` (a
//! [`PriorityClass`]) and `X-Deadline-Ms` (relative, in milliseconds). The device
//! lowers the priority to the tenant's ceiling; the server passes both as given.

use ai_infer_protocol::PriorityClass;

use super::error::ServeError;
use super::http::Request;
use crate::engine::InferOptions;

/// The priority header.
pub const PRIORITY_HEADER: &str = "X-Priority";
/// The deadline header.
pub const DEADLINE_HEADER: &str = "X-Deadline-Ms";

/// Parses a priority name: `batch`, `standard` (or `normal`), `interactive`,
/// `realtime`; case-insensitive.
pub fn parse_priority(value: &str) -> Result<PriorityClass, ServeError> {
    match value.trim().to_ascii_lowercase().as_str() {
        "batch" => Ok(PriorityClass::Batch),
        "standard" | "normal" => Ok(PriorityClass::Normal),
        "interactive" => Ok(PriorityClass::Interactive),
        "realtime" => Ok(PriorityClass::Realtime),
        _ => Err(ServeError::BadRequest(format!(
            "{PRIORITY_HEADER} {value:?} is not one of interactive, standard, batch, realtime"
        ))),
    }
}

/// The options of `request`: normal priority and no deadline unless its headers say
/// otherwise (`X-Deadline-Ms: 0` is no deadline).
pub fn infer_options(request: &Request) -> Result<InferOptions, ServeError> {
    let priority = request
        .header(PRIORITY_HEADER)
        .map(parse_priority)
        .transpose()?
        .unwrap_or_default();
    let deadline_us = match request.header(DEADLINE_HEADER) {
        None => 0,
        Some(v) => v
            .trim()
            .parse::<u64>()
            .ok()
            .and_then(|ms| ms.checked_mul(1000))
            .ok_or_else(|| {
                ServeError::BadRequest(format!(
                    "{DEADLINE_HEADER} {v:?} is not a number of milliseconds"
                ))
            })?,
    };
    Ok(InferOptions {
        priority,
        deadline_us,
        request_id: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(headers: &[(&str, &str)]) -> Request {
        Request {
            headers: headers
                .iter()
                .map(|(n, v)| (n.to_string(), v.to_string()))
                .collect(),
            ..Request::default()
        }
    }

    #[test]
    fn headers_map_onto_priority_and_deadline() {
        assert_eq!(infer_options(&with(&[])).unwrap(), InferOptions::default());
        let o = infer_options(&with(&[
            ("x-priority", "Interactive"),
            ("X-Deadline-Ms", "250"),
        ]))
        .unwrap();
        assert_eq!(
            (o.priority, o.deadline_us),
            (PriorityClass::Interactive, 250_000)
        );
        for (name, class) in [
            ("batch", PriorityClass::Batch),
            ("standard", PriorityClass::Normal),
            ("normal", PriorityClass::Normal),
            ("realtime", PriorityClass::Realtime),
        ] {
            assert_eq!(parse_priority(name).unwrap(), class);
        }
        for bad in [
            &[("X-Priority", "urgent")][..],
            &[("X-Deadline-Ms", "-5")],
            &[("X-Deadline-Ms", "1.5")],
            &[("X-Deadline-Ms", "18446744073709551615")],
        ] {
            assert_eq!(
                infer_options(&with(bad)).unwrap_err().http_status(),
                400,
                "{bad:?}"
            );
        }
    }
}
