//! The accept predicates: closures, the named predicates and their combinators.

use tower_backstop::accept::{Accept, AcceptAll, AcceptOk};

type R = Result<Option<u32>, &'static str>;

fn some(r: &R) -> bool {
    matches!(r, Ok(Some(_)))
}

#[test]
fn closures_and_named_predicates() {
    let (hit, miss, err): (R, R, R) = (Ok(Some(1)), Ok(None), Err("down"));

    assert!(AcceptOk.accept(&hit) && AcceptOk.accept(&miss) && !AcceptOk.accept(&err));
    assert!(AcceptAll.accept(&hit) && AcceptAll.accept(&miss) && AcceptAll.accept(&err));

    let closure = |r: &R| matches!(r, Ok(Some(n)) if *n > 0);
    assert!(closure.accept(&hit) && !closure.accept(&miss) && !closure.accept(&err));
    assert!(some.accept(&hit) && !some.accept(&miss));
}

#[test]
fn combinators() {
    let (hit, miss, err): (R, R, R) = (Ok(Some(1)), Ok(None), Err("down"));
    let only_some = AcceptOk.and(some);
    assert_eq!(
        [&hit, &miss, &err].map(|r| only_some.accept(r)),
        [true, false, false]
    );

    // `AcceptOk` accepts every `T, E`, so the types are named where nothing else fixes them.
    let some_or_error = (some as fn(&R) -> bool).or(Accept::<Option<u32>, &str>::not(AcceptOk));
    assert_eq!(
        [&hit, &miss, &err].map(|r| some_or_error.accept(r)),
        [true, false, true]
    );

    let never = Accept::<Option<u32>, &str>::not(AcceptAll);
    assert_eq!(
        [&hit, &miss, &err].map(|r| never.accept(r)),
        [false, false, false]
    );
}

#[test]
fn combinators_short_circuit() {
    use std::cell::Cell;
    let asked = Cell::new(0);
    let counting = |_: &R| {
        asked.set(asked.get() + 1);
        true
    };
    let err: R = Err("down");
    assert!(!AcceptOk.and(&counting).accept(&err));
    assert!(AcceptAll.or(&counting).accept(&err));
    assert_eq!(asked.get(), 0);
}
