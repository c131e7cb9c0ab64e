//! The wire format pinned: a golden string per message, round trips, framing limits and timeouts.

use super::*;
use proptest::prelude::*;

fn payload(frame: &[u8]) -> &[u8] {
    let len = frame_len(frame[..4].try_into().unwrap()).unwrap();
    assert_eq!(len, frame.len() - 4);
    &frame[4..]
}

#[test]
fn wire_example_is_what_we_send() {
    let frame = encode_request(&Request::Enqueue {
        drv_path: Some("/nix/store/hrnw32bvgf2gvs4zqkcrbqwbjhi40kq8-ht-a.drv".into()),
        out_paths: vec![],
        source: "hook".into(),
    });
    assert_eq!(
        std::str::from_utf8(payload(&frame)).unwrap(),
        r#"{"v":1,"op":"enqueue","drv_path":"/nix/store/hrnw32bvgf2gvs4zqkcrbqwbjhi40kq8-ht-a.drv","out_paths":[],"source":"hook"}"#
    );
    assert_eq!(&frame[..4], &[0, 0, 0, 0x77]);
}

/// The JSON of every message, pinned: the hook, the CLI and the daemon of different versions must keep
/// understanding each other, so a change here is a protocol change, never an accident.
#[test]
fn every_message_has_a_pinned_json() {
    let path = "/nix/store/ripzxnb3whas7h2iw572d3b0sby1nxxw-vec-top";
    let entry = QueueEntry {
        target: "default".into(),
        path: StorePath::parse(path, "/nix/store").unwrap(),
        state: EntryState::Failed,
        attempts: 3,
        next_attempt_at_ms: 1_700_000_000_000,
        last_error: Some("HTTP 500".into()),
        enqueued_at_ms: 1_699_999_000_000,
        updated_at_ms: 1_700_000_000_001,
        source: "hook".into(),
    };
    let requests = [
        (
            Request::Enqueue {
                drv_path: None,
                out_paths: vec![path.into()],
                source: "push".into(),
            },
            GOLDEN_REQUESTS[0],
        ),
        (Request::Status, GOLDEN_REQUESTS[1]),
        (
            Request::List {
                target: None,
                after: Some(path.into()),
                limit: Some(10),
            },
            GOLDEN_REQUESTS[2],
        ),
        (
            Request::Retry {
                target: None,
                paths: vec![path.into()],
                all: false,
            },
            GOLDEN_REQUESTS[3],
        ),
        (
            Request::Drop {
                path: path.into(),
                target: None,
            },
            GOLDEN_REQUESTS[4],
        ),
    ];
    for (request, golden) in requests {
        let frame = encode_request(&request);
        assert_eq!(std::str::from_utf8(payload(&frame)).unwrap(), golden);
        assert_eq!(decode_request(golden.as_bytes()).unwrap(), request);
    }
    let responses = [
        (
            Response::Ack {
                accepted: vec![path.into()],
                duplicate: 1,
                refused: vec!["refused /tmp/x: not inside the store directory /nix/store".into()],
            },
            GOLDEN_RESPONSES[0],
        ),
        (
            Response::Error {
                kind: ErrorKind::PermissionDenied,
                message: "uid 1000 may not retry".into(),
            },
            GOLDEN_RESPONSES[1],
        ),
        (
            Response::List {
                entries: vec![entry],
                next: None,
            },
            GOLDEN_RESPONSES[2],
        ),
        (
            Response::Changed {
                paths: vec![path.into()],
            },
            GOLDEN_RESPONSES[3],
        ),
    ];
    for (response, golden) in responses {
        let frame = encode_response(&response);
        assert_eq!(std::str::from_utf8(payload(&frame)).unwrap(), golden);
        assert_eq!(decode_response(golden.as_bytes()).unwrap(), response);
    }
    let kinds: Vec<String> = [
        ErrorKind::Malformed,
        ErrorKind::TooLarge,
        ErrorKind::Timeout,
        ErrorKind::Version,
        ErrorKind::PermissionDenied,
        ErrorKind::Refused,
        ErrorKind::Internal,
    ]
    .iter()
    .map(|k| serde_json::to_string(k).unwrap())
    .collect();
    assert_eq!(
        kinds.join(","),
        r#""malformed","too_large","timeout","version","permission_denied","refused","internal""#
    );
}

const GOLDEN_REQUESTS: [&str; 5] = [
    r#"{"v":1,"op":"enqueue","drv_path":null,"out_paths":["/nix/store/ripzxnb3whas7h2iw572d3b0sby1nxxw-vec-top"],"source":"push"}"#,
    r#"{"v":1,"op":"status"}"#,
    r#"{"v":1,"op":"list","after":"/nix/store/ripzxnb3whas7h2iw572d3b0sby1nxxw-vec-top","limit":10}"#,
    r#"{"v":1,"op":"retry","paths":["/nix/store/ripzxnb3whas7h2iw572d3b0sby1nxxw-vec-top"],"all":false}"#,
    r#"{"v":1,"op":"drop","path":"/nix/store/ripzxnb3whas7h2iw572d3b0sby1nxxw-vec-top"}"#,
];

const GOLDEN_RESPONSES: [&str; 4] = [
    r#"{"v":1,"reply":"ack","accepted":["/nix/store/ripzxnb3whas7h2iw572d3b0sby1nxxw-vec-top"],"duplicate":1,"refused":["refused /tmp/x: not inside the store directory /nix/store"]}"#,
    r#"{"v":1,"reply":"error","kind":"permission_denied","message":"uid 1000 may not retry"}"#,
    r#"{"v":1,"reply":"list","entries":[{"path":"/nix/store/ripzxnb3whas7h2iw572d3b0sby1nxxw-vec-top","state":"failed","attempts":3,"next_attempt_at_ms":1700000000000,"last_error":"HTTP 500","enqueued_at_ms":1699999000000,"updated_at_ms":1700000000001,"source":"hook","target":"default"}],"next":null}"#,
    r#"{"v":1,"reply":"changed","paths":["/nix/store/ripzxnb3whas7h2iw572d3b0sby1nxxw-vec-top"]}"#,
];

#[test]
fn status_reply_round_trips() {
    let report = crate::status::tests::sample();
    let frame = encode_response(&Response::Status(Box::new(report.clone())));
    let back = decode_response(payload(&frame)).unwrap();
    assert_eq!(back, Response::Status(Box::new(report)));
}

#[test]
fn bad_frames_are_named() {
    assert!(matches!(
        frame_len((2 * MAX_FRAME_BYTES as u32).to_be_bytes()),
        Err(Error::TooLarge { .. })
    ));
    assert!(matches!(frame_len([0; 4]), Err(Error::Malformed(_))));
    assert!(matches!(decode_request(b"hello"), Err(Error::Malformed(_))));
    assert!(matches!(
        decode_request(br#"{"v":2,"op":"status"}"#),
        Err(Error::Version(2))
    ));
    assert!(matches!(
        decode_request(br#"{"op":"status"}"#),
        Err(Error::Malformed(_))
    ));
    assert!(matches!(
        decode_request(br#"{"v":1,"op":"launch"}"#),
        Err(Error::Malformed(_))
    ));
    let mut short: &[u8] = &[0, 0, 0, 9, b'{'];
    assert!(matches!(read_frame(&mut short), Err(Error::Closed)));
}

#[test]
fn minimal_enqueue_gets_defaults() {
    let r = decode_request(br#"{"v":1,"op":"enqueue","out_paths":["/nix/store/x"]}"#).unwrap();
    assert_eq!(
        r,
        Request::Enqueue {
            drv_path: None,
            out_paths: vec!["/nix/store/x".into()],
            source: "hook".into()
        }
    );
}

fn any_request() -> impl Strategy<Value = Request> {
    let text = ".{0,40}";
    prop_oneof![
        (
            proptest::option::of(text),
            proptest::collection::vec(text, 0..4),
            text
        )
            .prop_map(|(drv_path, out_paths, source)| Request::Enqueue {
                drv_path,
                out_paths,
                source
            }),
        Just(Request::Status),
        (
            proptest::option::of(text),
            proptest::option::of(0usize..5000)
        )
            .prop_map(|(after, limit)| Request::List {
                after,
                limit,
                target: None
            }),
        (proptest::collection::vec(text, 0..3), any::<bool>()).prop_map(|(paths, all)| {
            Request::Retry {
                paths,
                all,
                target: None,
            }
        }),
        text.prop_map(|path| Request::Drop { path, target: None }),
    ]
}

fn any_response() -> impl Strategy<Value = Response> {
    let text = ".{0,40}";
    prop_oneof![
        (
            proptest::collection::vec(text, 0..4),
            any::<usize>(),
            proptest::collection::vec(text, 0..2)
        )
            .prop_map(|(accepted, duplicate, refused)| Response::Ack {
                accepted,
                duplicate,
                refused
            }),
        text.prop_map(|message| Response::Error {
            kind: ErrorKind::Refused,
            message
        }),
        proptest::collection::vec(text, 0..3).prop_map(|paths| Response::Changed { paths }),
    ]
}

proptest! {
    #[test]
    fn requests_round_trip(request in any_request()) {
        let frame = encode_request(&request);
        let mut reader = &frame[..];
        let payload = read_frame(&mut reader).unwrap();
        prop_assert_eq!(decode_request(&payload).unwrap(), request);
    }

    #[test]
    fn responses_round_trip(response in any_response()) {
        let frame = encode_response(&response);
        let mut reader = &frame[..];
        let payload = read_frame(&mut reader).unwrap();
        prop_assert_eq!(decode_response(&payload).unwrap(), response);
    }

    #[test]
    fn decoder_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
        let _ = decode_request(&bytes);
        let mut reader = &bytes[..];
        let _ = read_frame(&mut reader);
    }
}
