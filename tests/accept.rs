//! The accept predicates: closures, the named predicates and their combinators.

use tower_backstop::accept::{Accept, AcceptAll, AcceptOk, And, Not, Or};

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

    // `AcceptOk` judges every `T, E`: `Not::new` leaves the types to the use site.
    let some_or_error = (some as fn(&R) -> bool).or(Not::new(AcceptOk));
    assert_eq!(
        [&hit, &miss, &err].map(|r| some_or_error.accept(r)),
        [true, false, true]
    );

    let never = Not::new(AcceptAll);
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

#[test]
fn constructors_combine_predicates_of_every_type() {
    let (hit, miss, err): (R, R, R) = (Ok(Some(1)), Ok(None), Err("down"));
    let ok_and_all = And::new(AcceptOk, AcceptAll);
    let ok_or_none = Or::new(Not::new(AcceptAll), AcceptOk);
    assert_eq!(
        [&hit, &miss, &err].map(|r| ok_and_all.accept(r)),
        [true, true, false]
    );
    assert_eq!(
        [&hit, &miss, &err].map(|r| ok_or_none.accept(r)),
        [true, true, false]
    );
}
