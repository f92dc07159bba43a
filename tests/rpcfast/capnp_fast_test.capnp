@0xb5e1c8a2f0d34e71;
# A test-only schema for rpcfast._capnp_fast: every supported type, non-zero defaults, and
# structs the fast codec must leave to pycapnp (a union, a group, AnyPointer, a pointer default).

enum Color { red @0; green @1; blue @2; }

struct Inner {
  n @0 :Int32;
  label @1 :Text;
  blob @2 :Data;
}

struct Everything {
  v @0 :Void;
  b @1 :Bool;
  i8 @2 :Int8;
  i16 @3 :Int16;
  i32 @4 :Int32;
  i64 @5 :Int64;
  u8 @6 :UInt8;
  u16 @7 :UInt16;
  u32 @8 :UInt32;
  u64 @9 :UInt64;
  f32 @10 :Float32;
  f64 @11 :Float64;
  color @12 :Color;
  data @13 :Data;
  text @14 :Text;
  inner @15 :Inner;
  inners @16 :List(Inner);
  datas @17 :List(Data);
  texts @18 :List(Text);
  bools @19 :List(Bool);
  i8s @20 :List(Int8);
  u16s @21 :List(UInt16);
  i32s @22 :List(Int32);
  u64s @23 :List(UInt64);
  f32s @24 :List(Float32);
  f64s @25 :List(Float64);
  colors @26 :List(Color);
  voids @27 :List(Void);
  b2 @28 :Bool;
  next @29 :Everything;
}

struct Defaults {
  b @0 :Bool = true;
  i8 @1 :Int8 = -5;
  i32 @2 :Int32 = 123456;
  i64 @3 :Int64 = -9000000000;
  u16 @4 :UInt16 = 65535;
  u64 @5 :UInt64 = 0xfedcba9876543210;
  f32 @6 :Float32 = 1.5;
  f64 @7 :Float64 = -2.25;
  color @8 :Color = blue;
  b2 @9 :Bool = false;
  b3 @10 :Bool = true;
  name @11 :Text;
}

# Schema evolution: the same struct with fewer fields (an older writer or reader).
struct InnerOld {
  n @0 :Int32;
}

struct WithUnion {
  a @0 :UInt32;
  u :union {
    x @1 :UInt8;
    y @2 :Text;
  }
}

struct WithGroup {
  g :group {
    p @0 :UInt32;
    q @1 :UInt32;
  }
}

struct WithAny {
  any @0 :AnyPointer;
}

struct WithPointerDefault {
  t @0 :Text = "hello";
}

struct HoldsUnion {
  inner @0 :WithUnion;
}

struct Nested {
  lists @0 :List(List(UInt8));
}

# Schema evolution in nested positions: HoldsOld reads HoldsNew's messages and vice versa.
struct HoldsOld {
  one @0 :InnerOld;
  many @1 :List(InnerOld);
}

struct HoldsNew {
  one @0 :Inner;
  many @1 :List(Inner);
  extra @2 :UInt64;
}
